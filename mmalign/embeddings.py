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

from mmalign.errors import UserError


class PrefixError(UserError, ValueError):
    """A ``dim`` that is no prefix of the embeddings (below 1 or above the model's dim).

    Example:
        >>> check_prefix(100, 64, None)
        Traceback (most recent call last):
        ...
        mmalign.embeddings.PrefixError: dim 100 is outside 1..64, the model's dim (--dim); \
pass a dim in that range, e.g. a trained prefix [64]
    """


def truncate(embeddings: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of each row, renormalized (all-zero rows stay zero).

    Example:
        >>> import torch
        >>> truncate(torch.tensor([[3.0, 4.0, 12.0]]), 2).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if not 1 <= dim <= embeddings.shape[-1]:
        raise PrefixError(
            f"dim {dim} is outside 1..{embeddings.shape[-1]}, the embeddings' width (--dim); "
            "pass a dim in that range"
        )
    return F.normalize(embeddings[..., :dim], dim=-1)


def check_prefix(dim: int, full_dim: int, trained: Sequence[int] | None) -> None:
    """Refuse a ``dim`` outside ``1..full_dim``; warn when it is not a trained prefix
    (``trained``: the model's ``matryoshka`` list, ``None`` when it was trained at full size
    only).

    Example:
        >>> check_prefix(32, 128, [16, 32, 64, 128])
    """
    prefixes = list(trained) if trained else [full_dim]
    if not 1 <= dim <= full_dim:
        raise PrefixError(
            f"dim {dim} is outside 1..{full_dim}, the model's dim (--dim); pass a dim in that "
            f"range, e.g. a trained prefix {prefixes}"
        )
    if dim not in prefixes:
        warnings.warn(
            f"dim {dim} is not a trained Matryoshka prefix (trained: {prefixes}); its "
            "truncated embeddings may retrieve much worse than a trained prefix",
            UserWarning,
            stacklevel=3,
        )
