"""Label-free quality of embeddings: RankMe, alignment, uniformity and the modality gap.

They need no labels, so a run can choose its best checkpoint without them
(``eval.best_metric: val/rankme/mean``, ``best_mode: max``):

- **RankMe** (Garrido et al. 2023) of one modality's embeddings ``Z [N, d]``: with singular
  values ``s_k`` and ``p_k = s_k / sum(s) + 1e-7``, ``exp(-sum_k p_k log p_k)``, the
  effective rank, between 1 (collapsed) and ``min(N, d)``. Higher is better.
- **alignment** (Wang & Isola 2020) of a modality pair over samples that have both:
  ``mean_i ||x_i - y_i||^2``. Lower is better.
- **uniformity** (Wang & Isola 2020) of one modality: ``log mean_{i<j} exp(-2 ||z_i - z_j||^2)``.
  Lower (more uniform on the sphere) is better.
- **modality gap** (Liang et al. 2022) of a pair: the distance between the two modalities'
  mean embeddings, ``||mean(x) - mean(y)||``.

Example:
    >>> import torch
    >>> round(rankme(torch.eye(4)), 4)
    4.0
    >>> alignment(torch.eye(2), torch.eye(2))
    0.0
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

RANKME_EPS = 1e-7
"""The ``epsilon`` RankMe adds to each normalized singular value (as in the paper)."""


def rankme(embeddings: Tensor) -> float:
    """The effective rank of ``[N, d]`` embeddings (see the module docstring).

    Example:
        >>> round(rankme(torch.tensor([[1.0, 0.0], [2.0, 0.0]])), 4)
        1.0
    """
    singular = torch.linalg.svdvals(embeddings.double())
    p = singular / singular.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(first: Tensor, second: Tensor) -> float:
    """Mean squared distance between paired rows (Wang & Isola's alignment, alpha = 2).

    Example:
        >>> alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        2.0
    """
    return float((first.double() - second.double()).pow(2).sum(dim=1).mean())


def uniformity(embeddings: Tensor, t: float = 2.0) -> float:
    """``log`` of the mean Gaussian potential over distinct pairs of rows (Wang & Isola).

    Example:
        >>> round(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), 4)
        -8.0
    """
    z = embeddings.double()
    if z.shape[0] < 2:
        raise ValueError("uniformity needs at least two embeddings")
    distances = torch.pdist(z).pow(2)
    return float(torch.logsumexp(-t * distances, dim=0) - math.log(distances.numel()))


def modality_gap(first: Tensor, second: Tensor) -> float:
    """The distance between the mean embeddings of two modalities.

    Example:
        >>> round(modality_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])), 4)
        1.4142
    """
    return float((first.double().mean(dim=0) - second.double().mean(dim=0)).norm())


def label_free_metrics(
    embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor], prefix: str = "val/"
) -> dict[str, float]:
    """Every label-free metric of a validation set: ``{prefix}rankme/<m>``,
    ``uniformity/<m>`` per modality, ``alignment/<a>-<b>``, ``gap/<a>-<b>`` per pair (rows
    with both), and the ``.../mean`` of each family. Modalities with fewer than two present
    rows (pairs with fewer than two shared rows) are left out.

    Example:
        >>> every = torch.ones(3, dtype=torch.bool)
        >>> metrics = label_free_metrics({"a": torch.eye(3), "b": torch.eye(3)},
        ...                              {"a": every, "b": every})
        >>> metrics["val/alignment/a-b"], round(metrics["val/rankme/mean"], 3)
        (0.0, 3.0)
    """
    metrics: dict[str, float] = {}
    for name, values in embeddings.items():
        rows = values[present[name]]
        if rows.shape[0] >= 2:
            metrics[f"{prefix}rankme/{name}"] = rankme(rows)
            metrics[f"{prefix}uniformity/{name}"] = uniformity(rows)
    for first, second in itertools.combinations(embeddings, 2):
        both = present[first] & present[second]
        if int(both.sum()) >= 2:
            x, y = embeddings[first][both], embeddings[second][both]
            metrics[f"{prefix}alignment/{first}-{second}"] = alignment(x, y)
            metrics[f"{prefix}gap/{first}-{second}"] = modality_gap(x, y)
    for family in ("rankme", "uniformity", "alignment", "gap"):
        values = [v for k, v in metrics.items() if k.startswith(f"{prefix}{family}/")]
        if values:
            metrics[f"{prefix}{family}/mean"] = sum(values) / len(values)
    return metrics
