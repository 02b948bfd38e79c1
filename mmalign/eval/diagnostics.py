"""Embedding diagnostics: alignment, uniformity, effective rank and the modality gap.

- ``alignment/{a}-{b}``: mean squared distance of positive pairs, E ||x_i - y_i||^2
  (Wang and Isola, 2020); lower is better aligned, 0 for identical embeddings.
- ``uniformity/{m}``: log E_{i<j} exp(-2 ||x_i - x_j||^2) over distinct rows (Wang and
  Isola's t = 2); lower means more uniform on the sphere.
- ``rank/{m}``: RankMe effective rank (Garrido et al., 2023), exp of the entropy of the
  singular values normalized to sum to one; between 1 and min(N, d).
- ``gap/{a}-{b}``: modality gap (Liang et al., 2022), the distance between the centroids of
  the two modalities' embeddings.

Example:
    >>> import torch
    >>> x = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    >>> round(embedding_diagnostics({"a": x, "b": x})["alignment/a-b"], 6)
    0.0
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

RANKME_EPS = 1e-7
"""Added to the normalized singular values before the entropy, as in RankMe."""


def alignment(x: Tensor, y: Tensor) -> float:
    """Mean squared distance between paired rows ``x[i]`` and ``y[i]``.

    Example:
        >>> alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        2.0
    """
    return float((x.double() - y.double()).pow(2).sum(dim=1).mean())


def uniformity(x: Tensor, t: float = 2.0) -> float:
    """log of the mean Gaussian potential exp(-t ||x_i - x_j||^2) over pairs i < j.

    Example:
        >>> round(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), 3)
        -8.0
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least two embeddings")
    return float(torch.pdist(x.double()).pow(2).mul(-t).exp().mean().log())


def effective_rank(x: Tensor) -> float:
    """RankMe: exp(entropy) of the singular values normalized to a distribution.

    Example:
        >>> round(effective_rank(torch.eye(4)), 3)
        4.0
    """
    singular_values = torch.linalg.svdvals(x.double())
    distribution = singular_values / singular_values.sum() + RANKME_EPS
    return float(torch.exp(-(distribution * distribution.log()).sum()))


def modality_gap(x: Tensor, y: Tensor) -> float:
    """Euclidean distance between the centroids of ``x`` and ``y``.

    Example:
        >>> modality_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        1.0
    """
    return float((x.double().mean(dim=0) - y.double().mean(dim=0)).norm())


def _rows(embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None, name: str):
    values = embeddings[name].detach().cpu()
    if present is None or name not in present:
        return values, torch.ones(values.shape[0], dtype=torch.bool)
    return values, present[name].detach().cpu().bool()


def embedding_diagnostics(
    embeddings: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str]] | None = None,
    present: Mapping[str, Tensor] | None = None,
    max_uniformity_samples: int = 4096,
) -> dict[str, float]:
    """Alignment and gap per pair, uniformity and effective rank per modality.

    ``embeddings`` maps modality -> ``[N, d]``, row i of every modality from the same sample.
    ``pairs`` defaults to every pair in dict order. ``present`` (modality -> ``BoolTensor[N]``)
    marks the rows that exist; alignment uses rows where both sides exist, the other metrics
    each modality's own rows. Uniformity uses the first ``max_uniformity_samples`` rows
    (its cost is quadratic).

    Example:
        >>> import torch
        >>> e = {"a": torch.eye(3), "b": torch.eye(3)}
        >>> sorted(embedding_diagnostics(e))
        ['alignment/a-b', 'gap/a-b', 'rank/a', 'rank/b', 'uniformity/a', 'uniformity/b']
    """
    names = list(embeddings)
    for a, b in pairs or []:
        for name in (a, b):
            if name not in embeddings:
                raise ValueError(f"pair ({a}, {b}): modality {name!r} is not among {names}")
    metrics: dict[str, float] = {}
    for first, second in pairs if pairs is not None else itertools.combinations(names, 2):
        x, x_present = _rows(embeddings, present, first)
        y, y_present = _rows(embeddings, present, second)
        both = x_present & y_present
        if both.any():
            metrics[f"alignment/{first}-{second}"] = alignment(x[both], y[both])
        if x_present.any() and y_present.any():
            metrics[f"gap/{first}-{second}"] = modality_gap(x[x_present], y[y_present])
    for name in names:
        x, x_present = _rows(embeddings, present, name)
        rows = x[x_present]
        if rows.shape[0] >= 2:
            metrics[f"uniformity/{name}"] = uniformity(rows[:max_uniformity_samples])
        if rows.shape[0] >= 1:
            metrics[f"rank/{name}"] = effective_rank(rows)
    return dict(sorted(metrics.items()))
