"""Label-free validation metrics: the embedding diagnostics as ``val/...`` keys, with means.

The formulas live in :mod:`mmalign.eval.diagnostics`: RankMe effective rank
(``val/rank/<m>``; higher is better, between 1 for collapsed embeddings and min(N, d)),
alignment (``val/alignment/<a>-<b>``; lower is better), uniformity (``val/uniformity/<m>``;
lower is more uniform) and the modality gap (``val/gap/<a>-<b>``). Each family also gets its
mean over modalities or pairs (``val/rank/mean``, ...), so that a run can pick its best
checkpoint without labels (``eval.best_metric: val/rank/mean``, ``best_mode: max``).

Example:
    >>> import torch
    >>> every = torch.ones(3, dtype=torch.bool)
    >>> metrics = label_free_metrics({"a": torch.eye(3), "b": torch.eye(3)},
    ...                              {"a": every, "b": every})
    >>> metrics["val/alignment/a-b"], round(metrics["val/rank/mean"], 3)
    (0.0, 3.0)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mmalign.eval.diagnostics import embedding_diagnostics

FAMILIES = ("rank", "alignment", "uniformity", "gap")
"""The label-free metric families; each gets a ``.../mean``."""


def label_free_metrics(
    embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor], prefix: str = "val/"
) -> dict[str, float]:
    """:func:`~mmalign.eval.diagnostics.embedding_diagnostics` of every modality and pair,
    named ``{prefix}{family}/{modality or pair}``, plus ``{prefix}{family}/mean``."""
    diagnostics = embedding_diagnostics(embeddings, present=present)
    metrics = {f"{prefix}{name}": value for name, value in diagnostics.items()}
    for family in FAMILIES:
        values = [value for name, value in diagnostics.items() if name.startswith(f"{family}/")]
        if values:
            metrics[f"{prefix}{family}/mean"] = sum(values) / len(values)
    return metrics
