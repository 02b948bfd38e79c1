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
    >>> import warnings

import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "clip"})
    >>> embeddings = {"image": torch.eye(3), "text": torch.eye(3)}
    >>> out = objective(embeddings, logit_scale=torch.tensor(10.0))
    >>> round(out.loss.item(), 4), sorted(out.metrics)[:2]
    (0.0001, ['logit_scale', 'loss'])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mmalign.config import ObjectiveConfig, objective_config
from mmalign.errors import config_error
from mmalign.objectives.distributed import BatchView, all_reduce_mean
from mmalign.objectives.options.pairwise import PairTermsConfig, PairwiseConfig
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.objectives.positives import rows_without_negatives
from mmalign.registry import OBJECTIVE_OPTIONS, OBJECTIVES

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

    Subclasses set ``config_class`` (their :class:`~mmalign.config.ObjectiveConfig`) and
    implement :meth:`terms`; one whose similarity is not the pairwise sum (Symile's
    multilinear product) overrides :meth:`score`.
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    learns_bias: bool = False
    """Whether the model keeps a learned ``logit_bias`` for this objective (SigLIP)."""
    scores_jointly: bool = False
    """Whether :meth:`score` combines the query modalities jointly (Symile's product), so
    retrieval is reported N-way (each modality from all the others) instead of per pair."""

    def __init__(self, config: ObjectiveConfig) -> None:
        super().__init__()
        self.config = config
        self._warned_lone_group = False

    def score(
        self,
        query_embeddings: Mapping[str, Tensor],
        candidate_embeddings: Tensor,
        present: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Scores ``[N, C]`` of queries (modality -> ``[N, d]``, one or several modalities of
        each query) against candidates ``[C, d]``: the similarity this objective trains.

        Pairwise objectives sum the query modalities' dot products with the candidate (the
        Symile paper's zero-shot rule for CLIP); ``present`` (modality -> ``BoolTensor[N]``)
        drops absent entries. Zero-shot classification, validation and search call this.

        Example:
            >>> q = {"a": torch.tensor([[1.0, -1.0]]), "b": torch.tensor([[1.0, -1.0]])}
            >>> build_objective({"name": "clip"}).score(q, torch.eye(2)).tolist()
            [[2.0, -2.0]]
        """
        combined, _ = combine_queries(query_embeddings, present, identity=0.0)
        return combined.sum(dim=0) @ candidate_embeddings.detach().float().cpu().T

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
        return self.config.term_names(modalities)

    def forward(
        self,
        embeddings: dict[str, Tensor],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        present: Tensor | None = None,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
    ) -> LossOutput:
        """The loss of a batch of embeddings ``{modality: [B, d]}``; see the module docstring.
        ``groups`` (``LongTensor[B]``) makes rows of one group positives of each other as
        ``config.positives`` says (:mod:`mmalign.objectives.positives`)."""
        modalities = list(embeddings)
        weights = self._weights(modalities)
        batch = BatchView.gather(
            embeddings, present, with_grad=self.config.gather_with_grad, groups=groups
        )
        logit_scale = torch.as_tensor(logit_scale, dtype=batch.dtype, device=batch.device)
        terms = self.terms(batch, logit_scale, logit_bias, generator)
        output = _combine(terms, weights, batch, logit_scale, logit_bias)
        if isinstance(self.config, PositivesConfig) and self.config.positives == "exclude":
            output.metrics["positives/rows_without_negatives"] = self._lone_group(batch)
        return output

    def _lone_group(self, batch: BatchView) -> float:
        """The rows of the global batch left with no negative by ``positives: exclude`` (their
        loss is 0); warns the first time there are any."""
        lone = rows_without_negatives(batch.global_groups)
        if lone and not self._warned_lone_group:
            self._warned_lone_group = True
            warnings.warn(
                f"positives: exclude: {lone} of {batch.global_rows} rows share their group "
                "with every row of the batch, so they have no negative left (a loss of exactly 0 "
                "for clip, anchored and symile) "
                "(model.objective.positives; counted as train/positives/rows_without_negatives "
                "in metrics.jsonl); use larger batches, data whose groups mix, or "
                "positives: multi",
                UserWarning,
                stacklevel=2,
            )
        return float(lone)

    def _weights(self, modalities: list[str]) -> dict[str, float]:
        try:
            self.config.check_modalities(modalities)
        except ValidationError as error:
            raise config_error(error, CONFIG_FIELD, "objective for this batch") from None
        given = self.config.weights or {}
        return {name: float(given.get(name, 1.0)) for name in self.term_names(modalities)}


def combine_queries(
    query_embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None,
    identity: float,
) -> tuple[Tensor, Tensor]:
    """Query embeddings stacked ``[Q, N, d]`` (CPU, float) with absent entries replaced by
    ``identity``, and which rows have any modality; an empty query row is an error."""
    if not query_embeddings:
        raise ValueError("scoring needs at least one query modality")
    stacked, masks = [], []
    for name, embedding in query_embeddings.items():
        embedding = embedding.detach().float().cpu()
        rows = embedding.shape[0]
        mask = torch.ones(rows, dtype=torch.bool) if present is None else present[name].cpu()
        stacked.append(torch.where(mask[:, None], embedding, identity))
        masks.append(mask)
    any_present = torch.stack(masks).any(dim=0)
    if not any_present.all():
        row = int((~any_present).nonzero()[0])
        raise ValueError(
            f"query row {row} has no modality (every entry is absent); give at least one of "
            f"{sorted(query_embeddings)} for each query"
        )
    return torch.stack(stacked), any_present


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

    config_class: ClassVar[type[PairTermsConfig]] = PairwiseConfig
    config: PairTermsConfig

    def pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        return self.config.resolve_pairs(modalities)


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator that makes an objective nameable in configs (``name: <name>``), with its
    ``config_class`` as the options of ``name: <name>``
    (:data:`~mmalign.registry.OBJECTIVE_OPTIONS`), which validate its section of the config
    when the config loads (``mmalign train``: before torch loads).

    Example:
        >>> class MarginConfig(ObjectiveConfig):
        ...     margin: float = 0.2
        >>> @register_objective("margin_demo")
        ... class MarginObjective(PairwiseObjective):
        ...     config_class = MarginConfig
        >>> build_objective({"name": "margin_demo", "margin": 0.5}).config.margin
        0.5
    """

    def register(cls: type[Objective]) -> type[Objective]:
        OBJECTIVE_OPTIONS.register(name)(cls.config_class)
        return OBJECTIVES.register(name)(cls)

    return register


def build_objective(
    config: ObjectiveConfig | Mapping[str, Any], modalities: Sequence[str] | None = None
) -> Objective:
    """Build the objective that ``config`` (or the same dict) names; with ``modalities``
    its fields are checked against them.

    Example:
        >>> type(build_objective({"name": "symile", "negatives": "n2"})).__name__
        'SymileObjective'
    """
    try:
        config = objective_config(config, modalities)
    except ValidationError as error:
        raise config_error(error, CONFIG_FIELD, "objective config") from None
    return OBJECTIVES.get(config.name)(config)


class WrappingObjective(Objective):
    """An objective around another, ``inner``: it scores, names its terms, learns a bias and
    scores jointly as ``inner`` does, and changes only the loss (Matryoshka prefixes,
    auxiliary terms).

    Example:
        >>> from mmalign.objectives import build_objective
        >>> WrappingObjective(build_objective({"name": "symile"})).scores_jointly
        True
    """

    def __init__(self, inner: Objective) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.learns_bias = inner.learns_bias
        self.scores_jointly = inner.scores_jointly

    def score(
        self,
        query_embeddings: Mapping[str, Tensor],
        candidate_embeddings: Tensor,
        present: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The inner objective's score (see :meth:`Objective.score`)."""
        return self.inner.score(query_embeddings, candidate_embeddings, present)

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        return self.inner.term_names(modalities)
