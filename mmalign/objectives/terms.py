"""``model.objective.terms``: the main objective plus weighted auxiliary terms.

    loss = main + sum_t weight_t * L_t

Each ``L_t`` averages its per-pair (or per-modality) parts like any objective
(:mod:`mmalign.objectives.base`: mean over valid rows of the global batch, then the mean of the
non-empty parts) and is logged as ``loss/<name>`` (``train/loss/<name>`` in the run's
metrics); the main objective's loss is ``loss/main``, its own metrics keep their names.
The terms (:mod:`mmalign.config.terms`):

* ``two_view`` (:mod:`mmalign.objectives.two_view`): NT-Xent between ``m`` and its second view
  ``m@view2``, which the loader adds to the batch.
* ``distill`` (:mod:`mmalign.objectives.distill`): KL to a frozen teacher's embeddings
  ``m@teacher``, which the training step adds to the embeddings (once per micro-batch).
* ``queue`` (:mod:`mmalign.objectives.queue`): InfoNCE against the batch plus past embeddings.

Embeddings whose key has an ``@`` (``graph@view2``, ``image@teacher``) go to the terms only;
the main objective sees the modalities. A term whose inputs a batch lacks (validation batches
have no second views and no teacher embeddings) is left out of that batch's loss.
``distill`` and ``queue`` use the main objective's pairs (``clip``/``anchored``/``sigmoid``;
every pair for ``symile``).

What is exact: ``two_view`` and ``distill`` are ordinary functions of the global batch, so they
are exact under exact accumulation (the second views are cached and spliced like any modality,
the teacher's embeddings have no gradient) and under the cross-process gather. ``queue`` is
exact too *within* a step (the queue only changes in :meth:`TermsObjective.end_step`, after
the update); across steps it holds the global batches of earlier steps, so its content depends
on the global batch, not on how it is split over processes or micro-batches, except for the
order of rows inside one step, which the loss does not depend on unless a step's rows are only
partly evicted (``size`` not a multiple of the global batch).

Example:
    >>> import torch
    >>> from mmalign.config.terms import term_config
    >>> from mmalign.objectives import build_objective
    >>> terms = [term_config({"type": "queue", "size": 8})]
    >>> objective = TermsObjective(build_objective({"name": "clip"}), terms, ["a", "b"], 4)
    >>> embeddings = {m: torch.nn.functional.normalize(torch.randn(4, 4), dim=-1) for m in "ab"}
    >>> out = objective(embeddings, torch.tensor(10.0))
    >>> sorted(out.metrics)
    ['logit_scale', 'loss', 'loss/a-b', 'loss/main', 'loss/queue']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.batch import base_modality, second_view
from mmalign.config.terms import DistillTerm, QueueTerm, TwoViewTerm
from mmalign.errors import ConfigError
from mmalign.objectives.base import (
    LossOutput,
    Objective,
    TermLoss,
    WrappingObjective,
    _combine,
)
from mmalign.objectives.distill import TEACHER, distill_term, teacher_name
from mmalign.objectives.distributed import BatchView, all_reduce_mean
from mmalign.objectives.options.pairwise import PairTermsConfig
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.objectives.queue import EmbeddingQueue, present_rows, queue_term
from mmalign.objectives.two_view import nt_xent_term


class TermsObjective(WrappingObjective):
    """``inner`` (the main objective) plus the auxiliary ``terms``; see the module docstring.

    ``teacher_logit_scale`` (the teacher's multiplier) is set by whoever loads the teacher;
    ``distill`` without ``temperature`` needs it.
    """

    def __init__(
        self, inner: Objective, terms: Sequence[Any], modalities: Sequence[str], dim: int
    ) -> None:
        super().__init__(inner)
        self.term_configs = list(terms)
        self.modalities = list(modalities)
        self.teacher_logit_scale: float | None = None
        self._pending: tuple[dict[str, Tensor], dict[str, Tensor] | None] = ({}, None)
        sizes = [term.size for term in terms if isinstance(term, QueueTerm)]
        if sizes and not isinstance(inner.config, PairTermsConfig):
            raise ConfigError(
                f"model.objective.terms: queue needs a pairwise objective (clip, anchored, "
                f"sigmoid), not {inner.config.name!r}; remove the queue term"
            )
        self.queue = EmbeddingQueue(self.modalities, dim, sizes[0]) if sizes else None

    def pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        """The main objective's pairs (every pair when it is not pairwise)."""
        if isinstance(self.config, PairTermsConfig):
            return self.config.resolve_pairs(modalities)
        return [(a, b) for index, a in enumerate(modalities) for b in modalities[index + 1 :]]

    def forward(
        self,
        embeddings: dict[str, Tensor],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        present: Tensor | None = None,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
    ) -> LossOutput:
        """The main loss on the modalities plus the weighted terms (see the module doc)."""
        names = list(embeddings)
        main = [name for name in names if base_modality(name) == name]
        main_present = None if present is None else present[:, [names.index(m) for m in main]]
        out = self.inner(
            {name: embeddings[name] for name in main},
            logit_scale,
            logit_bias,
            main_present,
            generator,
            groups=groups,
        )
        batch, teachers = self._gather(embeddings, present, groups)
        scale = torch.as_tensor(logit_scale, dtype=batch.dtype, device=batch.device)
        loss, metrics = out.loss, {**out.metrics, "loss/main": out.metrics["loss"]}
        for term in self.term_configs:
            parts = self._parts(term, batch, teachers, scale, self.pairs(main))
            if parts is None:  # validation batches have no second views nor teacher
                continue
            value = _combine(parts, {part.name: 1.0 for part in parts}, batch, scale, None)
            loss = loss + term.weight * value.loss
            metrics[f"loss/{term.name}"] = value.metrics["loss"]
        metrics["loss"] = float(all_reduce_mean(loss.detach().reshape(1)))
        return LossOutput(loss=loss, metrics=metrics)

    def _gather(
        self, embeddings: dict[str, Tensor], present: Tensor | None, groups: Tensor | None
    ) -> tuple[BatchView, BatchView | None]:
        """The student's embeddings (modalities and second views, with ``groups``) and the
        teacher's (their own width), each gathered over processes."""
        names = list(embeddings)
        rows = next(iter(embeddings.values())).shape[0]
        if present is None:
            device = next(iter(embeddings.values())).device
            present = torch.ones(rows, len(names), dtype=torch.bool, device=device)
        views: list[BatchView | None] = []
        for wanted in (False, True):
            chosen = [name for name in names if name.endswith(TEACHER) == wanted]
            columns = present[:, [names.index(name) for name in chosen]]
            part = {name: embeddings[name] for name in chosen}
            with_grad = self.config.gather_with_grad
            own_groups = None if wanted else groups
            views.append(BatchView.gather(part, columns, with_grad, own_groups) if chosen else None)
        assert views[0] is not None  # the modalities are always there
        return views[0], views[1]

    def _parts(
        self,
        term: Any,
        batch: BatchView,
        teachers: BatchView | None,
        scale: Tensor,
        pairs: list[tuple[str, str]],
    ) -> list[TermLoss] | None:
        """The parts of one term; ``None`` when the batch lacks its inputs (no second view,
        no teacher embeddings)."""
        if isinstance(term, TwoViewTerm):
            second = second_view(term.modality)
            if second not in batch.modalities:
                return None
            return [nt_xent_term(batch, term.modality, second, term.temperature, term.name)]
        if isinstance(term, DistillTerm):
            return self._distill(term, batch, teachers, scale, pairs)
        assert self.queue is not None  # the constructor makes it for a queue term
        used = sorted({name for pair in pairs for name in pair})
        self._pending = present_rows(batch, used)
        positives = self.config if isinstance(self.config, PositivesConfig) else None
        return [queue_term(batch, pair, scale, self.queue, positives) for pair in pairs]

    def _distill(
        self,
        term: DistillTerm,
        batch: BatchView,
        teachers: BatchView | None,
        scale: Tensor,
        pairs: list[tuple[str, str]],
    ) -> list[TermLoss] | None:
        if teachers is None:
            return None
        if term.temperature is not None:
            student: Tensor | float = 1.0 / term.temperature
            teacher: Tensor | float = 1.0 / term.temperature
        elif self.teacher_logit_scale is None:
            raise ValueError("distill without a temperature needs teacher_logit_scale")
        else:
            student, teacher = scale, self.teacher_logit_scale
        known = teachers.modalities
        taught = [pair for pair in pairs if all(teacher_name(name) in known for name in pair)]
        if not taught:
            raise ValueError(f"distill: the teacher gave no embeddings for the pairs {pairs}")
        return [distill_term(batch, teachers, pair, student, teacher) for pair in taught]

    def end_step(self) -> None:
        """After an optimizer step: push the step's global batch into the queue (if any)."""
        if self.queue is not None and self._pending[0]:
            self.queue.push(*self._pending)
        self._pending = ({}, None)


def with_terms(
    objective: Objective, terms: Sequence[Any], modalities: Sequence[str], dim: int
) -> Objective:
    """``objective`` with the auxiliary ``terms`` (unchanged when there are none).

    Example:
        >>> from mmalign.objectives import build_objective
        >>> type(with_terms(build_objective({"name": "clip"}), [], ["a", "b"], 4)).__name__
        'ClipObjective'
    """
    if not terms:
        return objective
    return TermsObjective(objective, terms, modalities, dim)
