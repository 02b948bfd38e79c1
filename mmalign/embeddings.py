"""The renormalized prefix of embeddings: the first ``dim`` coordinates of each normalized
embedding, normalized again (what ``model.matryoshka`` trains, and what ``encode(...,
dim=...)``, ``export --dim`` and ``search`` use).

Example:
    >>> import torch
    >>> truncate(torch.tensor([[3.0, 4.0, 12.0]]), 2).tolist()
    [[0.6000000238418579, 0.800000011920929]]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def truncate(embeddings: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of each row, renormalized (all-zero rows stay zero).

    Example:
        >>> import torch
        >>> truncate(torch.tensor([[3.0, 4.0, 12.0]]), 2).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if not 1 <= dim <= embeddings.shape[-1]:
        raise ValueError(f"dim must be between 1 and {embeddings.shape[-1]}, got {dim}")
    return F.normalize(embeddings[..., :dim], dim=-1)


def check_prefix(dim: int, full_dim: int, trained: Sequence[int] | None) -> None:
    """Refuse a ``dim`` outside ``1..full_dim``; warn when it is not a trained prefix
    (``trained``: the model's ``matryoshka`` list, ``None`` when it was trained at full size
    only).

    Example:
        >>> check_prefix(32, 128, [16, 32, 64, 128])
    """
    if not 1 <= dim <= full_dim:
        raise ValueError(f"dim must be between 1 and the model's dim {full_dim}, got {dim}")
    prefixes = list(trained) if trained else [full_dim]
    if dim not in prefixes:
        warnings.warn(
            f"dim {dim} is not a trained Matryoshka prefix (trained: {prefixes}); its "
            "truncated embeddings may retrieve much worse than a trained prefix",
            UserWarning,
            stacklevel=3,
        )
