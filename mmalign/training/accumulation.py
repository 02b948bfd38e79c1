"""Contrastive-exact gradient accumulation (as open_clip's ``accum_freq`` and GradCache).

Accumulating K micro-batches of B samples must give the gradient of ONE batch of K x B
samples, where every sample is a negative of every other. Summing K small-batch losses would
not (each would see only B - 1 negatives). So one optimizer step:

1. encodes every micro-batch without gradient and caches the embeddings (``[K x B, d]``),
   remembering the RNG state before each micro-batch so dropout can be replayed;
2. computes the full loss from the cache (its value is logged and checked for NaN/inf);
3. for each micro-batch j, restores its RNG state, re-encodes it with gradient, splices it
   into the cached embeddings and backpropagates the full loss through that slice; the
   temperature (and sigmoid bias) keeps its gradient in the last pass only, since the loss
   depends on it whole in every pass.

The K backward passes sum to the gradient of the big batch. The objective's random choices
(Symile's shuffled negatives) come from a generator re-seeded identically for every loss
evaluation of the step. Under DDP only the last backward pass synchronizes gradients.

Micro-batches are :class:`~mmalign.batch.Batch` objects already on the device; presence
masks are taken by modality name (:meth:`~mmalign.batch.Batch.present_for`).

Example:
    >>> import torch
    >>> cache = FeatureCache.build([{"a": torch.zeros(2, 3)}, {"a": torch.ones(1, 3)}],
    ...                            [torch.ones(2, 1, dtype=torch.bool),
    ...                             torch.ones(1, 1, dtype=torch.bool)])
    >>> cache.splice(1, {"a": torch.full((1, 3), 5.0)})[0]["a"][:, 0].tolist()
    [0.0, 0.0, 5.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmalign.batch import Batch
from mmalign.training.spill import InputSpill
from mmalign.training.timing import StepTimer

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmalign.model import AlignmentModel
    from mmalign.training.terms import Teacher


@dataclass
class FeatureCache:
    """Embeddings of all micro-batches of a step (no gradient), concatenated."""

    embeddings: dict[str, Tensor]
    present: Tensor
    offsets: list[int]
    groups: Tensor | None = None

    @classmethod
    def build(
        cls,
        features: Sequence[dict[str, Tensor]],
        presents: Sequence[Tensor],
        groups: Sequence[Tensor | None] = (),
    ) -> FeatureCache:
        """Concatenate per-micro-batch embeddings, presence masks and groups (if every
        micro-batch has them)."""
        offsets = [0]
        for present in presents:
            offsets.append(offsets[-1] + int(present.shape[0]))
        embeddings = {name: torch.cat([f[name] for f in features]) for name in features[0]}
        known = [group for group in groups if group is not None]
        joined = torch.cat(known) if known and len(known) == len(groups) else None
        return cls(embeddings, torch.cat(list(presents)), offsets, joined)

    def splice(self, index: int, embeddings: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """The cache with micro-batch ``index`` replaced by ``embeddings`` (with gradient)."""
        start, end = self.offsets[index], self.offsets[index + 1]
        spliced = {
            name: torch.cat([cached[:start], embeddings[name].to(cached.dtype), cached[end:]])
            for name, cached in self.embeddings.items()
        }
        return spliced, self.present


class ContrastiveStep(nn.Module):
    """The model and its objective in one ``forward``, so DDP sees every parameter used
    (the temperature lives outside the towers), and the loss runs under the same autocast.

    ``forward(batch, cache=None, index=0, generator=None) -> (loss, metrics)``. A
    ``teacher`` (the ``distill`` term's, :mod:`mmalign.training.teacher`) adds its embeddings.
    """

    def __init__(self, model: AlignmentModel, teacher: Teacher | None = None) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.timer: StepTimer | None = None

    def section(self, name: str) -> AbstractContextManager[None]:
        """Time a part of the step when a timer is attached."""
        return self.timer.section(name) if self.timer is not None else nullcontext()

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """Embeddings of one micro-batch (with the teacher's, when there is one)."""
        with self.section("forward"):
            embeddings = self.model(batch)
        if self.teacher is not None:
            with self.section("teacher"):
                embeddings.update(self.teacher.embed(batch))
        return embeddings

    def objective(
        self,
        embeddings: dict[str, Tensor],
        present: Tensor,
        generator: torch.Generator | None,
        temperature_grad: bool = True,
        groups: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The model's loss on ``embeddings`` (``present``: ``[B, M]``, columns in the order
        of ``embeddings``); ``temperature_grad=False`` detaches the temperature and bias
        (their gradient is taken once per accumulated step)."""
        with self.section("loss"):
            if temperature_grad:
                output = self.model.loss(
                    embeddings, present=present, generator=generator, groups=groups
                )
            else:
                bias = self.model.logit_bias
                output = self.model.objective(
                    dict(embeddings),
                    self.model.logit_scale_value().detach(),
                    None if bias is None else bias.detach(),
                    present=present,
                    generator=generator,
                    groups=groups,
                )
        return output.loss, output.metrics

    def forward(
        self,
        batch: Batch,
        cache: FeatureCache | None = None,
        index: int = 0,
        generator: torch.Generator | None = None,
        temperature_grad: bool = True,
    ) -> tuple[Tensor, dict[str, float]]:
        embeddings = self.encode(batch)
        present, groups = batch.present_for(list(embeddings)), batch.groups
        if cache is not None:
            embeddings, present = cache.splice(index, embeddings)
            groups = cache.groups
        return self.objective(embeddings, present, generator, temperature_grad, groups)


@dataclass
class StepOutcome:
    """What one optimizer step's forward/backward produced."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _finite_everywhere(accelerator: Accelerator, loss: Tensor) -> bool:
    """Whether the loss is finite on every process (all ranks must agree to skip a step)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.gather(flag.to(accelerator.device)).min()
    return bool(flag.item() > 0)


@dataclass
class _FirstPass:
    """What the first pass keeps of each micro-batch: its RNG state, embeddings, presence
    (columns in embedding order), groups, and the batch itself unless it was spilled."""

    states: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    features: list[dict[str, Tensor]] = field(default_factory=list)
    presents: list[Tensor] = field(default_factory=list)
    groups: list[Tensor | None] = field(default_factory=list)
    kept: list[Batch] = field(default_factory=list)


def _encode_all(
    inner: ContrastiveStep,
    micro_batches: Iterable[Batch],
    device: torch.device,
    spill: InputSpill | None,
) -> _FirstPass:
    """First pass, without gradient; with a ``spill``, each micro-batch's inputs go to disk
    right after it is encoded."""
    done = _FirstPass()
    for index, batch in enumerate(micro_batches):
        done.states.append(_rng_state(device))
        done.features.append(inner.encode(batch))
        done.presents.append(batch.present_for(list(done.features[-1])))
        done.groups.append(batch.groups)
        if spill is not None:
            spill.put(index, batch)
        else:
            done.kept.append(batch)
    return done


def _micro_batch(kept: list[Batch], spill: InputSpill | None, index: int) -> Batch:
    return spill.take(index) if spill is not None else kept[index]


def accumulated_step(
    accelerator: Accelerator,
    step_module: nn.Module,
    micro_batches: Iterable[Batch],
    make_generator: Callable[[], torch.Generator | None],
    timer: StepTimer | None = None,
    no_sync: Callable[[nn.Module], AbstractContextManager] | None = None,
    spill: InputSpill | None = None,
) -> StepOutcome:
    """Forward and backward of one optimizer step over ``micro_batches`` (see module doc).

    ``step_module`` is the (possibly DDP-wrapped) :class:`ContrastiveStep`;
    ``make_generator`` returns the step's freshly seeded generator for each loss evaluation.
    Gradients are left in ``.grad``; nothing is backpropagated when the loss is not finite.
    ``no_sync(step_module)`` is the context of the backward passes that must not synchronize
    gradients (default ``accelerator.no_sync``; FSDP: ``set_requires_gradient_sync``).
    ``micro_batches`` may be a lazy iterator; with a ``spill``
    (:class:`~mmalign.training.spill.InputSpill`) their inputs wait on disk between the two
    passes instead of in memory (the caller closes it).
    """
    inner: ContrastiveStep = accelerator.unwrap_model(step_module)
    inner.timer = timer
    batches = iter(micro_batches)
    first = next(batches)
    second = next(batches, None)
    if second is None:
        loss, metrics = step_module(first, generator=make_generator())
        finite = _finite_everywhere(accelerator, loss)
        if finite:
            with inner.section("backward"):
                accelerator.backward(loss)
        return StepOutcome(float(loss.detach()), metrics, finite)

    device = accelerator.device
    with torch.no_grad(), accelerator.autocast():
        done = _encode_all(inner, chain([first, second], batches), device, spill)
        del first, second
        after = _rng_state(device)
        cache = FeatureCache.build(done.features, done.presents, done.groups)
        done.features.clear()
        loss, metrics = inner.objective(
            cache.embeddings, cache.present, make_generator(), groups=cache.groups
        )
    finite = _finite_everywhere(accelerator, loss)
    if finite:
        last = len(done.states) - 1
        for index in range(last + 1):
            batch = _micro_batch(done.kept, spill, index)
            _set_rng_state(done.states[index], device)
            sync = nullcontext() if index == last else (no_sync or accelerator.no_sync)(step_module)
            with sync:
                sliced_loss, _ = step_module(batch, cache, index, make_generator(), index == last)
                with inner.section("backward"):
                    accelerator.backward(sliced_loss)
            del batch, sliced_loss
    _set_rng_state(after, device)
    return StepOutcome(float(loss.detach()), metrics, finite)
