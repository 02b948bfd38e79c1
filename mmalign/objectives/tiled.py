"""Exact pairwise losses in tiles: no ``B x B`` logit matrix, in the forward or the backward.

The pairwise objectives (``clip``, ``anchored``, ``sigmoid``) need, per pair of modalities,
reductions of the logits ``S = scale * Q @ K^T`` of this process's rows ``Q`` ``[R, d]``
against the global columns ``K`` ``[C, d]``:

* :func:`pair_logsumexp`: the log-sum-exp of every row (direction ``Q -> K``) **and** of every
  column (direction ``K -> Q``) of ``S``, from one matmul per tile. Each tile of
  ``tile x tile`` logits is folded into running (max, sum of exponentials) pairs in float32
  (the online log-sum-exp); the column pairs of all processes are then combined (every rank
  holds different rows of the same columns; :func:`mmalign.objectives.distributed.
  all_reduce_logsumexp`), so every rank gets the columns' log-sum-exps over the global batch,
  exactly as one process holding it would.
* :func:`pair_softplus_sum`: ``sum_ij softplus(S_ij + bias)``, SigLIP's loss of every entry
  as a negative (the positives' correction ``-S_ii`` is linear and computed outside); tiles
  are independent.

The backward pass recomputes each tile's logits and forms its gradient in place
(``g_row[i] exp(S - lse_row[i]) + g_col[j] exp(S - lse_col[j])``, or
``g sigmoid(S + bias)``), then ``dQ += dS @ K`` and ``dK += dS^T @ Q``. Across processes the
incoming gradient of the column log-sum-exps is summed over ranks first (the adjoint of the
forward combination), so each rank's ``dQ``/``dK`` is its rows' share of the one-process
gradient, and the gather's backward sums ``dK`` into the owners.

``drop`` (:class:`EntryDrop`) removes entries from both directions: same-group entries other
than a row's own (``positives: exclude``) or the own entry (``debiased``'s negatives). The
candidates themselves are chosen by the caller by selecting rows of ``Q`` and ``K``.

Memory: the inputs, their gradients and a few ``tile x tile`` float32 buffers, i.e.
``O((R + C) d + tile^2)``; work: ``R C d`` multiply-adds forward and ``3 R C d`` backward
(one recompute, two gradient matmuls), against ``2 R C d`` and ``4 R C d`` for the dense
two-direction loss.

Example:
    >>> import torch
    >>> q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    >>> rows, columns = pair_logsumexp(q, k, torch.tensor(2.0, dtype=torch.float64), tile=2)
    >>> logits = 2.0 * q @ k.T
    >>> torch.allclose(rows, logits.logsumexp(1)), torch.allclose(columns, logits.logsumexp(0))
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmalign.dist import world_size
from mmalign.errors import ConfigError
from mmalign.objectives.distributed import all_reduce_logsumexp, all_reduce_sum

DropKind = Literal["same_group", "own", "same_group_and_own"]
TileSetting = Literal["auto", "none"] | int
"""``model.objective.tile``: ``auto``, ``none`` (dense) or a tile size in rows."""

AUTO_MIN_ROWS = 2048
"""``tile: auto`` tiles from this global batch size on (below it the dense loss is faster)."""
AUTO_TILE = 2048
"""The tile size ``tile: auto`` uses."""


def tile_size(setting: TileSetting, global_rows: int, gather_with_grad: bool = True) -> int | None:
    """The tile size for a batch of ``global_rows`` rows, ``None`` for the dense path.

    ``auto`` tiles from :data:`AUTO_MIN_ROWS` rows on. Tiles need the all-gather with gradient
    across processes (each rank's column gradient goes to the owner of the column): ``auto``
    stays dense without it and a fixed size is refused.

    Example:
        >>> tile_size("auto", 512), tile_size("auto", 65536), tile_size(256, 8)
        (None, 2048, 256)
    """
    if setting == "none":
        return None
    without_grad = world_size() > 1 and not gather_with_grad
    if setting == "auto":
        return AUTO_TILE if global_rows >= AUTO_MIN_ROWS and not without_grad else None
    if without_grad:
        raise ConfigError(
            f"model.objective.tile {setting} across processes needs "
            "model.objective.gather_with_grad: true; set it or use tile: auto"
        )
    return int(setting)


@dataclass(frozen=True)
class EntryDrop:
    """Entries ``(i, j)`` left out of both directions, decided per tile from ids.

    ``row_index``/``column_index`` are the global row indices of ``Q``'s and ``K``'s rows;
    ``row_groups``/``column_groups`` their group ids (used by ``same_group``). ``same_group``
    drops entries of one group but different indices, ``own`` the entries of equal index,
    ``same_group_and_own`` both (Symile ``n``: a column whose tuple lies in the row's group,
    and the row's own column, whose logit the caller adds back).

    Example:
        >>> drop = EntryDrop("own", torch.arange(2), torch.arange(3))
        >>> drop.tile(slice(0, 2), slice(0, 3)).tolist()
        [[True, False, False], [False, True, False]]
    """

    kind: DropKind
    row_index: Tensor
    column_index: Tensor
    row_groups: Tensor | None = None
    column_groups: Tensor | None = None

    def tile(self, rows: slice, columns: slice) -> Tensor:
        """``BoolTensor[rows, columns]``: the dropped entries of one tile."""
        own = self.row_index[rows, None] == self.column_index[None, columns]
        if self.kind == "own":
            return own
        assert self.row_groups is not None and self.column_groups is not None
        same = self.row_groups[rows, None] == self.column_groups[None, columns]
        return same & ~own if self.kind == "same_group" else same | own


def _tiles(rows: int, columns: int, tile: int) -> Iterator[tuple[slice, slice]]:
    for row in range(0, rows, tile):
        for column in range(0, columns, tile):
            yield slice(row, row + tile), slice(column, column + tile)


def _tile_logits(
    queries: Tensor, keys: Tensor, scale: float, rows: slice, columns: slice, drop: EntryDrop | None
) -> Tensor:
    """``scale * queries[rows] @ keys[columns].T`` (the scale rides in the matmul's alpha)."""
    logits = torch.addmm(queries.new_zeros(()), queries[rows], keys[columns].T, beta=0, alpha=scale)
    if drop is not None:
        logits.masked_fill_(drop.tile(rows, columns), float("-inf"))
    return logits


def _gradient_matmuls(
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    scale: float,
    rows: slice,
    columns: slice,
    grad_queries: Tensor,
    grad_keys: Tensor,
) -> None:
    """``grad_queries += grad @ K`` (scaled at the end) and ``grad_keys += scale grad^T @ Q``."""
    grad_queries[rows].addmm_(grad, keys[columns])
    grad_keys[columns].addmm_(grad.T, queries[rows], alpha=scale)


def _finish_gradients(
    queries: Tensor, scale: Tensor, grad_queries: Tensor
) -> tuple[Tensor, Tensor]:
    """``d/d scale = sum_i q_i . (dS K)_i`` (no ``[R, d]`` temporary) and ``dQ = scale dS K``
    in place."""
    grad_scale = torch.dot(queries.reshape(-1), grad_queries.reshape(-1)).reshape(scale.shape)
    return grad_queries.mul_(scale), grad_scale


def _fold(running_max: Tensor, running_sum: Tensor, logits: Tensor, dim: int) -> None:
    """Fold one tile's logits into running (max, sum of exp(logit - max)) along ``dim``; the
    sum is a matrix-vector product (faster than a reduction, above all over columns)."""
    top = torch.maximum(running_max, logits.amax(dim=dim))
    shift = torch.where(torch.isfinite(top), top, 0.0)  # an all -inf line keeps sum 0
    running_sum.mul_((running_max - shift).exp_())
    if dim == 1:
        exps = (logits - shift[:, None]).exp_()
        running_sum.add_(exps @ exps.new_ones(exps.shape[1]))
    else:
        exps = (logits - shift[None, :]).exp_()
        running_sum.add_(exps.new_ones(exps.shape[0]) @ exps)
    running_max.copy_(top)


def _logsumexp(running_max: Tensor, running_sum: Tensor) -> Tensor:
    return running_max + running_sum.log()


def _gradient_shift(lse: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """``g exp(S - lse) = sign * exp(S - (lse - log|g|))``: the gradient's factor rides in
    the shift (one pass less per tile); ``sign`` is ``None`` when no ``g`` is negative. An
    empty line (``lse = -inf``) or ``g = 0`` gets shift ``+inf``: no gradient, no NaN."""
    shift = lse - grad.abs().log()
    shift = shift.masked_fill(~torch.isfinite(lse) | (grad == 0), float("inf"))
    return shift, (grad.sign() if bool((grad < 0).any()) else None)


class _PairLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, queries: Tensor, keys: Tensor, scale: Tensor, drop: EntryDrop | None, tile: int
    ) -> tuple[Tensor, Tensor]:
        scale_value = float(scale)
        rows, columns = queries.shape[0], keys.shape[0]
        row_max = queries.new_full((rows,), float("-inf"))
        row_sum = queries.new_zeros(rows)
        column_max = queries.new_full((columns,), float("-inf"))
        column_sum = queries.new_zeros(columns)
        for row, column in _tiles(rows, columns, tile):
            logits = _tile_logits(queries, keys, scale_value, row, column, drop)
            _fold(row_max[row], row_sum[row], logits, dim=1)
            _fold(column_max[column], column_sum[column], logits, dim=0)
        row_lse = _logsumexp(row_max, row_sum)
        column_lse = all_reduce_logsumexp(_logsumexp(column_max, column_sum))
        ctx.drop, ctx.tile = drop, tile
        ctx.save_for_backward(queries, keys, scale, row_lse, column_lse)
        return row_lse, column_lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: Tensor, grad_columns: Tensor) -> tuple[Tensor | None, ...]:
        queries, keys, scale, row_lse, column_lse = ctx.saved_tensors
        grad_columns = all_reduce_sum(grad_columns)
        row_shift, row_sign = _gradient_shift(row_lse, grad_rows)
        column_shift, column_sign = _gradient_shift(column_lse, grad_columns)
        scale_value = float(scale)
        grad_queries = torch.zeros_like(queries)
        grad_keys = torch.zeros_like(keys)
        for row, column in _tiles(queries.shape[0], keys.shape[0], ctx.tile):
            logits = _tile_logits(queries, keys, scale_value, row, column, ctx.drop)
            grad = (logits - row_shift[row, None]).exp_()
            if row_sign is not None:
                grad.mul_(row_sign[row, None])
            logits.sub_(column_shift[None, column]).exp_()
            if column_sign is not None:
                logits.mul_(column_sign[None, column])
            grad.add_(logits)
            del logits
            _gradient_matmuls(
                grad, queries, keys, scale_value, row, column, grad_queries, grad_keys
            )
        grad_queries, grad_scale = _finish_gradients(queries, scale, grad_queries)
        return grad_queries, grad_keys, grad_scale, None, None


class _PairSoftplusSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        queries: Tensor,
        keys: Tensor,
        scale: Tensor,
        bias: Tensor,
        drop: EntryDrop | None,
        tile: int,
    ) -> Tensor:
        scale_value = float(scale)
        total = queries.new_zeros(())
        for row, column in _tiles(queries.shape[0], keys.shape[0], tile):
            logits = _tile_logits(queries, keys, scale_value, row, column, drop).add_(bias)
            total += F.softplus(logits).sum()  # softplus(-inf) = 0: dropped entries add nothing
        ctx.drop, ctx.tile = drop, tile
        ctx.save_for_backward(queries, keys, scale, bias)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        queries, keys, scale, bias = ctx.saved_tensors
        scale_value = float(scale)
        grad_queries = torch.zeros_like(queries)
        grad_keys = torch.zeros_like(keys)
        grad_bias = queries.new_zeros(())
        for row, column in _tiles(queries.shape[0], keys.shape[0], ctx.tile):
            logits = _tile_logits(queries, keys, scale_value, row, column, ctx.drop).add_(bias)
            grad = logits.sigmoid_().mul_(grad_total)
            grad_bias += grad.sum()
            _gradient_matmuls(
                grad, queries, keys, scale_value, row, column, grad_queries, grad_keys
            )
        grad_queries, grad_scale = _finish_gradients(queries, scale, grad_queries)
        return grad_queries, grad_keys, grad_scale, grad_bias.reshape(bias.shape), None, None


def pair_logsumexp(
    queries: Tensor,
    keys: Tensor,
    scale: Tensor,
    drop: EntryDrop | None = None,
    tile: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of ``scale * queries @ keys.T`` without forming it.

    Returns ``(rows [R], columns [C])``; ``columns`` are over every process's ``queries``
    when ``torch.distributed`` runs (all ranks pass the same ``keys``). A row or column whose
    entries are all dropped gets ``-inf`` (and no gradient). Half precision is computed in
    float32. Differentiable in ``queries``, ``keys`` and ``scale``.
    """
    if tile < 1:
        raise ValueError(f"model.objective.tile must be >= 1, got {tile}")
    queries, keys, scale = _float32(queries, keys, scale)
    with torch.autocast(queries.device.type, enabled=False):
        return _PairLogSumExp.apply(queries, keys, scale, drop, tile)


def pair_softplus_sum(
    queries: Tensor,
    keys: Tensor,
    scale: Tensor,
    bias: Tensor,
    drop: EntryDrop | None = None,
    tile: int = 1024,
) -> Tensor:
    """``sum_ij softplus(scale * queries_i . keys_j + bias)`` over the entries not dropped,
    without forming the matrix; differentiable in every tensor argument.

    Example:
        >>> q, k = torch.randn(3, 2), torch.randn(4, 2)
        >>> dense = torch.nn.functional.softplus(2 * q @ k.T - 1).sum()
        >>> tiled = pair_softplus_sum(q, k, torch.tensor(2.0), torch.tensor(-1.0), tile=2)
        >>> torch.allclose(tiled, dense)
        True
    """
    if tile < 1:
        raise ValueError(f"model.objective.tile must be >= 1, got {tile}")
    queries, keys, scale = _float32(queries, keys, scale)
    bias = bias.to(queries.dtype)
    with torch.autocast(queries.device.type, enabled=False):
        return _PairSoftplusSum.apply(queries, keys, scale, bias, drop, tile)


def select_rows(index: Tensor, rows: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(index[mask], rows[mask])``, or both unchanged (no copy of ``rows``) when every row
    is selected.

    Example:
        >>> select_rows(torch.arange(3), torch.eye(3), torch.tensor([True, False, True]))[0]
        tensor([0, 2])
    """
    if bool(mask.all()):
        return index, rows
    return index[mask], rows[mask]


def own_dot_products(first: Tensor, second: Tensor) -> Tensor:
    """``first_i . second_i`` for every row, without an ``[R, d]`` temporary.

    Example:
        >>> own_dot_products(torch.eye(2), torch.ones(2, 2)).tolist()
        [1.0, 1.0]
    """
    return torch.einsum("id,id->i", first, second)


def _float32(queries: Tensor, keys: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Half-precision inputs are computed in float32 (sums of exponentials need it)."""
    if queries.dtype in (torch.float16, torch.bfloat16):
        queries, keys = queries.float(), keys.float()
    return queries, keys.to(queries.dtype), scale.to(queries.dtype)
