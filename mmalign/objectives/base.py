"""Shared pieces of every objective: the output type, the registry and term averaging.

How a loss is averaged (every objective follows this rule):

* An objective is a weighted sum of *terms*: one per pair of modalities (``clip``,
  ``anchored``, ``sigmoid``; named ``"a-b"``) or one per anchor modality (``symile``; named by
  the modality). A term has *valid rows*: samples that have every modality the term needs.
* A term's loss is the **mean over its valid rows** of the per-row loss, counted over the
  global batch (all processes). A term without valid rows is exactly zero.
* The objective's loss is the weighted mean of the terms that have at least one valid row:
  ``sum_t w_t L_t / sum_{t non-empty} w_t`` (weights default to 1, must be >= 0); zero (with a
  zero gradient) when every term is empty or has weight 0. With every modality present and
  equal weights this is the plain mean over terms, as in open_clip and the ``symile`` package.
* Across processes each rank returns ``world_size / N_t`` times the sum over its own valid
  rows, so the mean over ranks (what DDP's gradient averaging optimizes) is the loss above;
  ``metrics`` hold the global values.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "clip"})
    >>> embeddings = {"image": torch.eye(3), "text": torch.eye(3)}
    >>> out = objective(embeddings, logit_scale=torch.tensor(10.0))
    >>> round(out.loss.item(), 4), sorted(out.metrics)[:2]
    (0.0001, ['logit_scale', 'loss'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mmalign.config import ObjectiveConfig
from mmalign.objectives.distributed import BatchView, all_reduce_mean

CONFIG_FIELD = "model.objective"


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and float metrics to log (``loss/<term>``, ...)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TermLoss:
    """One term: the sum of its per-row losses over this process's rows and its global count."""

    name: str
    row_loss_sum: Tensor
    valid_rows: int


class Objective(nn.Module):
    """Base class: gathers the batch, asks the subclass for its terms, averages them.

    Subclasses set ``is_symile`` and implement :meth:`terms`.
    """

    is_symile: bool = False

    def __init__(self, config: ObjectiveConfig) -> None:
        super().__init__()
        self.config = config

    def terms(
        self,
        batch: BatchView,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        generator: torch.Generator | None,
    ) -> list[TermLoss]:
        raise NotImplementedError

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        """Names of the terms this objective computes for these modalities (weights' keys)."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: dict[str, Tensor],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        present: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The loss of a batch of embeddings ``{modality: [B, d]}``; see the module docstring."""
        modalities = list(embeddings)
        weights = self._weights(modalities)
        batch = BatchView.gather(embeddings, present, with_grad=self.config.gather_with_grad)
        logit_scale = torch.as_tensor(logit_scale, dtype=batch.dtype, device=batch.device)
        terms = self.terms(batch, logit_scale, logit_bias, generator)
        return _combine(terms, weights, batch, logit_scale, logit_bias)

    def _weights(self, modalities: list[str]) -> dict[str, float]:
        names = self.term_names(modalities)
        given = self.config.weights or {}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"{CONFIG_FIELD}.weights has keys {unknown} that name no term of "
                f"'{self.config.name}' for modalities {modalities}; use keys from {names}"
            )
        negative = sorted(name for name, weight in given.items() if weight < 0)
        if negative:
            raise ValueError(f"{CONFIG_FIELD}.weights for {negative} are negative; use >= 0")
        return {name: float(given.get(name, 1.0)) for name in names}


def _combine(
    terms: list[TermLoss],
    weights: dict[str, float],
    batch: BatchView,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
) -> LossOutput:
    term_losses = {
        term.name: term.row_loss_sum * (batch.world_size / max(term.valid_rows, 1))
        for term in terms
    }
    active = [term.name for term in terms if term.valid_rows > 0 and weights[term.name] > 0]
    total_weight = sum(weights[name] for name in active)
    loss = batch.zero()  # keeps every embedding in the graph (DDP needs every tower used)
    for name in active:
        loss = loss + term_losses[name] * (weights[name] / total_weight)
    names = ["loss", *(f"loss/{name}" for name in term_losses)]
    values = all_reduce_mean(torch.stack([loss.detach(), *term_losses.values()]).detach())
    metrics = {name: float(value) for name, value in zip(names, values.tolist())}
    metrics["logit_scale"] = float(logit_scale.detach())
    if logit_bias is not None:
        metrics["logit_bias"] = float(torch.as_tensor(logit_bias).detach())
    return LossOutput(loss=loss, metrics=metrics)


class PairwiseObjective(Objective):
    """An objective with one term per pair of modalities: the configured ``pairs`` or all."""

    def pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        return resolve_pairs(self.config.pairs, modalities)

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        return [pair_name(pair) for pair in self.pairs(modalities)]


def resolve_pairs(
    pairs: Sequence[tuple[str, str]] | None, modalities: Sequence[str]
) -> list[tuple[str, str]]:
    """The configured pairs checked against the batch's modalities, or every pair."""
    if pairs is None:
        return [
            (first, second)
            for index, first in enumerate(modalities)
            for second in modalities[index + 1 :]
        ]
    for pair in pairs:
        missing = [name for name in pair if name not in modalities]
        if missing or pair[0] == pair[1]:
            raise ValueError(
                f"{CONFIG_FIELD}.pairs has {list(pair)}, which needs two different modalities "
                f"among {list(modalities)}; fix the pair or the model's towers"
            )
    return [tuple(pair) for pair in pairs]


def pair_name(pair: tuple[str, str]) -> str:
    """A pair's term name, the key of its weight: ``"image-text"``."""
    return f"{pair[0]}-{pair[1]}"


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator that makes an objective available to ``build_objective`` by name.

    Example:
        >>> @register_objective("my_loss")  # doctest: +SKIP
        ... class MyLoss(Objective): ...
    """

    def decorate(cls: type[Objective]) -> type[Objective]:
        _REGISTRY[name] = cls
        return cls

    return decorate


def build_objective(config: ObjectiveConfig | dict) -> Objective:
    """Build the objective that ``config`` (or the same dict) names.

    Example:
        >>> build_objective({"name": "symile", "negatives": "n2"}).is_symile
        True
    """
    if not isinstance(config, ObjectiveConfig):
        try:
            config = ObjectiveConfig.model_validate(config)
        except ValidationError as error:
            problems = "; ".join(
                f"{CONFIG_FIELD}.{'.'.join(map(str, item['loc']))}: {item['msg']}"
                for item in error.errors()
            )
            raise ValueError(f"invalid objective config: {problems}") from None
    if config.name not in _REGISTRY:
        raise ValueError(
            f"{CONFIG_FIELD}.name '{config.name}' is not a registered objective; "
            f"choose one of {sorted(_REGISTRY)}"
        )
    return _REGISTRY[config.name](config)
