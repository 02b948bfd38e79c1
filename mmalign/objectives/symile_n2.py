"""Exact Symile ``n2`` log-sum-exps in blocks: no B^(M-1) x d products, no B x B^(M-1) logits.

With modalities ``E_0 .. E_{M-1}`` (``[B, d]`` each, ``E_0`` already multiplied by the logit
scale) the logits form one tensor ``T[i_0, ..., i_{M-1}] = sum_d prod_m E_m[i_m, d]`` with
``B^M`` entries. Anchor ``m``'s normalizer for row ``v`` is the log-sum-exp of ``T`` over every
entry with ``i_m = v``; all ``M`` anchors share the same tensor, so one pass computes all of
them. The pass walks the ``B^(M-1)`` candidate combinations ``c = (p, k)`` (``p`` the prefix
``(i_1, ..., i_{M-2})``, ``k = i_{M-1}``) in blocks of ``q = max(1, block_size // B)``
prefixes: it forms the block's products ``P[p, k] = prefix[p] * E_{M-1}[k]`` (a broadcast, no
gather) and the logits ``L = E_0 @ P^T`` (one BLAS matmul, ``[B, q * B]``) and folds them into

* anchor 0: a running log-sum-exp over each row of ``L``;
* anchor ``M - 1``: the column log-sum-exps of ``L`` reduced over the block's prefixes;
* the prefix anchors: the column log-sum-exps reduced over ``k`` and scattered (log-sum-exp)
  into the bins ``i_m`` of the block's prefixes.

Each block is walked in tiles (:data:`~mmalign.objectives.symile_n2_blocks.TILE_FLOATS`
logits, every anchor row times a run of the block's columns): a tile's matmul, shift,
exponential and sums (and in the backward pass its gradient factor, both gradient matmuls
and the fold of ``dP`` into the last modality and the prefixes) run while it is in cache, so
no ``B x block`` matrix is written to or read back from memory.

The backward pass recomputes each tile and forms ``dT = g_0[i] softmax_0 + sum_m g_m[i_m]
softmax_m`` with one exponential per entry, ``exp(L - r[c])`` with ``r[c] = min_m lse_m[i_m]``
(known from the forward pass, at least the column's largest logit), times a
rank-one-plus-row factor (see ``_block_gradients``) that neither overflows nor underflows.
Then ``dE_0 = dT @ P`` and ``dP = dT^T @ E_0``, scattered into the other modalities.
Memory is ``O(B * d + block_size * d)`` (the tile and block buffers are reused, not
reallocated); time is four ``B^M * d`` matmul-equivalents plus two exponentials per entry
and a few passes over each tile in cache (the shift, the two sums as matrix-vector products,
the backward's factor and product). The forward pass shifts each column by a bound on its
``|logit|`` known before the matmul
(:meth:`~mmalign.objectives.symile_n2_blocks.Workspace.column_bound`); only where that bound
is too loose (wide logit ranges) does each tile take its column maxima instead.

``block_precision="bf16"`` runs the block matmuls (forward, recompute, both gradient
matmuls) in bfloat16: the backends accumulate in float32 and round each result entry to
bfloat16 once; maxima, shifts, exponentials, log-sum-exps and every reduction stay in the
inputs' precision. It pays where the hardware multiplies bf16 faster than float32 (GPUs,
CPUs with AVX512-BF16 or AMX); on CPUs without bf16 instructions (AVX2 only) torch's bf16
matmul is several times slower than float32.

With ``groups`` (``positives: exclude``, and ``debiased`` with every row its own group) each
block sets to ``-inf`` the entries whose rows all share one group before anything reads them
(:mod:`mmalign.objectives.symile_n2_blocks`), in the forward pass and in the backward
recomputation; a row or column left with no entry gets ``-inf`` and no gradient.

With ``torch.distributed`` running, each rank takes an equal share of the prefixes
(``B^M / world_size`` work), the partial log-sum-exps are combined across ranks, and the
backward pass sums the incoming gradients of all ranks before computing its share.

Example:
    >>> import torch
    >>> x, y, z = (torch.randn(5, 4, dtype=torch.float64) for _ in range(3))
    >>> lse = symile_logsumexp(x, [y, z], block_size=7)
    >>> naive = torch.einsum("id,jd,kd->ijk", x, y, z)
    >>> torch.allclose(lse[1], naive.logsumexp(dim=(0, 2)))
    True
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmalign.objectives.distributed import all_reduce_logsumexp, all_reduce_sum
from mmalign.objectives.symile_n2_blocks import Block, Tile, Workspace, prefix_products

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""``block_precision`` -> dtype of the block matmuls (``None``: the inputs' own dtype)."""


def _scatter_logsumexp(values: Tensor, index: Tensor, bins: int) -> Tensor:
    """``out[b] = logsumexp(values[index == b])`` (``-inf`` for empty or all ``-inf`` bins)."""
    top = values.new_full((bins,), float("-inf")).scatter_reduce(0, index, values, "amax")
    top = top.clamp_(min=torch.finfo(top.dtype).min)
    sums = values.new_zeros(bins).index_add_(0, index, (values - top[index]).exp())
    return top + sums.log()


def _finite(column_max: Tensor) -> Tensor:
    """A fully masked column's maximum (``-inf``) becomes the dtype's lowest finite value, so
    that ``logits - column_max`` stays ``-inf`` there (not NaN)."""
    return column_max.clamp_(min=torch.finfo(column_max.dtype).min)


def _block_logsumexps(workspace: Workspace, block: Block, ones: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of the block's logits with one exponential per entry, a
    tile at a time (:meth:`~mmalign.objectives.symile_n2_blocks.Workspace.tiles`).

    ``E = exp(L - shift)`` gives the columns directly; rows are ``log(E @ exp(shift - top)) +
    top``. Both sums are matrix-vector products on the tile in cache. The shift is the
    columns' bound where it is tight (``top`` known before any tile), else each tile's column
    maxima, with ``top`` a running maximum that rescales the row sums when it grows. A row
    whose sum falls under ``sqrt(tiny)`` (its logits lie far below the block's largest) lost
    precision to underflow and is recomputed exactly.
    """
    bound = workspace.column_bound(block)
    shift = workspace.anchor.new_empty(block.candidates) if bound is None else bound
    top = float("-inf") if bound is None else float(bound.max())
    weights = None if bound is None else (bound - top).exp()
    column_sums = torch.empty_like(shift)
    row_sums = ones.new_zeros(workspace.rows)
    tiles = workspace.tiles(block)
    pieces = zip(workspace.split(shift, block), workspace.split(column_sums, block))
    tile_weights = workspace.split(weights, block) if weights is not None else [None] * len(tiles)
    for tile, (tile_shift, tile_sums), tile_weight in zip(tiles, pieces, tile_weights):
        logits = workspace.tile_logits(block, tile)
        if tile_weight is None:
            tile_shift.copy_(_finite(logits.amax(dim=0).to(shift.dtype)))
            tile_top = float(tile_shift.max())
            if tile_top > top:
                row_sums.mul_(math.exp(top - tile_top))
                top = tile_top
            tile_weight = (tile_shift - top).exp()
        exps = workspace.exp_tile(tile, tile_shift)
        torch.mv(exps.T, ones, out=tile_sums)
        row_sums.addmv_(exps, tile_weight)
    columns_lse = column_sums.log_().add_(shift)
    inexact = row_sums < torch.finfo(row_sums.dtype).tiny ** 0.5
    rows_lse = row_sums.log_().add_(top)
    if inexact.any():
        rows_lse[inexact] = workspace.row_logits(inexact, block).logsumexp(dim=1)
    return rows_lse, columns_lse


def _forward_pass(workspace: Workspace) -> Tensor:
    rows, count = workspace.rows, len(workspace.others) + 1
    lse = workspace.anchor.new_full((count, rows), float("-inf"))
    ones = workspace.anchor.new_ones(rows)
    for block in workspace.blocks():
        rows_lse, columns_lse = _block_logsumexps(workspace, block, ones)
        lse[0] = torch.logaddexp(lse[0], rows_lse)
        columns_lse = columns_lse.view(-1, rows)
        lse[-1] = torch.logaddexp(lse[-1], columns_lse.logsumexp(dim=0))
        prefix_lse = columns_lse.logsumexp(dim=1)
        for m, index in enumerate(block.indices, start=1):
            lse[m] = torch.logaddexp(lse[m], _scatter_logsumexp(prefix_lse, index, rows))
    return all_reduce_logsumexp(lse)


def _safe_gap(dtype: torch.dtype) -> float:
    """Largest ``top - lse_0[i]`` for which ``exp(colmax - top) * exp(top - lse_0[i])`` loses
    nothing that matters to underflow (the lost terms are below ``tiny ** 0.3``)."""
    return -0.7 * math.log(torch.finfo(dtype).tiny)


def _column_shift(block: Block, lse: Tensor, rows: int) -> Tensor:
    """``r[c] = min over the non-anchor-0 anchors m of lse_m[i_m(c)]``: known before the
    matmul and at least the column's largest logit (each ``lse_m`` sums over the column)."""
    shift = lse[-1].expand(block.prefix.shape[0], rows)
    for m, index in enumerate(block.indices, start=1):
        shift = torch.minimum(shift, lse[m][index, None])
    return shift.reshape(-1).nan_to_num(posinf=0.0)


def _block_gradients(
    workspace: Workspace, block: Block, lse: Tensor, grad_lse: Tensor, grads: list[Tensor]
) -> Tensor:
    """Add the block's gradients to ``grads[0]`` (the anchor) and ``grads[-1]`` (the last
    modality); return the gradient of the block's prefix products (``[q, d]``). Each tile
    recomputes its logits, forms

    ``dL = g_0[i] exp(L - lse_0[i]) + sum_m g_m[i_m] exp(L - lse_m[i_m])
    = exp(L - r[c]) * (a[i] w[c] + h[c])`` with the column shift ``r`` of
    :func:`_column_shift` (so ``exp(L - r) <= 1``), ``w = exp(r - top)``,
    ``a = g_0 exp(top - lse_0)`` and ``h = sum_m g_m exp(r - lse_m) <= |g|`` (one exponential
    per entry; rows whose ``a`` would overflow are added exactly), runs both gradient
    matmuls on it while it is in cache and folds ``dP = dT^T @ E_0`` into the last modality and
    the prefixes while that is in cache too (:func:`_fold_product_gradient`).
    """
    rows = workspace.rows
    shift = _column_shift(block, lse, rows)
    top = shift.max()
    grid = shift.view(-1, rows)
    column_factor = grad_lse[-1] * (grid - lse[-1]).exp()
    for m, index in enumerate(block.indices, start=1):
        column_factor += grad_lse[m][index, None] * (grid - lse[m][index, None]).exp()
    column_factor = column_factor.view(-1)
    safe_gap = _safe_gap(workspace.anchor.dtype)
    gap = top - lse[0]
    exact = gap > safe_gap
    row_factor = torch.where(exact, 0.0, grad_lse[0] * gap.clamp(max=safe_gap).exp())[:, None]
    column_weight = (shift - top).exp()
    any_exact = bool(exact.any())
    pieces = zip(
        workspace.tiles(block),
        workspace.split(shift, block),
        workspace.split(column_factor, block),
        workspace.split(column_weight, block),
    )
    grad_prefix = torch.zeros_like(block.prefix)
    for tile, tile_shift, tile_factor, tile_weight in pieces:
        workspace.tile_logits(block, tile)
        grad = workspace.exp_tile(tile, tile_shift)
        grad.mul_(torch.addcmul(tile_factor, row_factor, tile_weight, out=tile.factor))
        if any_exact:
            exact_logits = workspace.row_logits(exact, block, tile)
            grad[exact] += grad_lse[0][exact, None] * (exact_logits - lse[0][exact, None]).exp()
        grad_products = workspace.gradient_matmuls(tile, grads[0])
        _fold_product_gradient(grad_products, tile, block, workspace.others[-1], grads, grad_prefix)
    return grad_prefix


def _fold_product_gradient(
    grad_products: Tensor,
    tile: Tile,
    block: Block,
    last: Tensor,
    grads: list[Tensor],
    grad_prefix: Tensor,
) -> None:
    """``P[p, k] = prefix[p] * last[k]``: add ``sum_p dP[p, k] * prefix[p]`` to ``grad_last``
    (``grads[-1]``) and ``sum_k dP[p, k] * last[k]`` to ``grad_prefix`` for the tile's
    candidates (``dP`` is consumed)."""
    rows = tile.high - tile.low
    last_rows, grad_rows = last[tile.low : tile.high], grads[-1][tile.low : tile.high]
    for offset, prefix in enumerate(range(tile.first, tile.last)):
        grad = grad_products[offset * rows : (offset + 1) * rows]
        grad_rows.addcmul_(grad, block.prefix[prefix])
        grad_prefix[prefix] += grad.mul_(last_rows).sum(dim=0)


def _backward_pass(workspace: Workspace, lse: Tensor, grad_lse: Tensor) -> list[Tensor]:
    """The forward pass's ``lse = -inf`` (every entry of that row masked, so none needs a
    gradient) becomes ``+inf`` here: its ``exp(L - lse)`` terms are then 0, it never sets a
    column shift, and a column left without shift (all masked) is shifted by 0."""
    anchor, others = workspace.anchor, workspace.others
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    grads = [torch.zeros_like(anchor), *(torch.zeros_like(other) for other in others)]
    for block in workspace.blocks():
        prefixes = block.prefix.shape[0]
        grad_prefix = _block_gradients(workspace, block, lse, grad_lse, grads)
        for m, index in enumerate(block.indices):
            rest = prefix_products(others[:-1], block.indices, prefixes, anchor, skip=m)
            grads[m + 1].index_add_(0, index, grad_prefix * rest)
    return grads


class _Context(Protocol):
    """What :class:`_SymileLogSumExp`'s ``ctx`` carries from forward to backward."""

    prefixes_per_block: int
    low: torch.dtype | None
    groups: Tensor | None

    @property
    def saved_tensors(self) -> tuple[Tensor, ...]: ...

    def save_for_backward(self, *tensors: Tensor) -> None: ...


class _SymileLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: _Context,
        block_size: int,
        low: torch.dtype | None,
        groups: Tensor | None,
        anchor: Tensor,
        *others: Tensor,
    ) -> Tensor:
        prefixes_per_block = max(1, block_size // anchor.shape[0])
        lse = _forward_pass(Workspace(anchor, list(others), prefixes_per_block, low, groups))
        ctx.prefixes_per_block, ctx.low, ctx.groups = prefixes_per_block, low, groups
        ctx.save_for_backward(lse, anchor, *others)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: _Context, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        lse, anchor, *others = ctx.saved_tensors
        workspace = Workspace(
            anchor, others, ctx.prefixes_per_block, ctx.low, ctx.groups, backward=True
        )
        return None, None, None, *_backward_pass(workspace, lse, all_reduce_sum(grad_lse))


def symile_logsumexp(
    anchor: Tensor,
    others: list[Tensor],
    block_size: int = 16384,
    block_precision: str = "fp32",
    groups: Tensor | None = None,
) -> Tensor:
    """Every anchor's Symile ``n2`` log-sum-exp, ``[M, B]``, computed in blocks.

    ``out[0, i] = logsumexp over all (j, k, ...) of MIP(anchor[i], others[0][j], others[1][k],
    ...)`` and ``out[m, v]`` the same over every entry whose ``m``-th modality row is ``v``.
    ``anchor`` carries the logit scale; half precision is computed in float32. A block holds
    ``max(1, block_size // B)`` prefixes, that is at least ``B`` candidates. Differentiable in
    every input.

    ``block_precision``: ``"fp32"`` runs the block matmuls in the inputs' precision (float32,
    or float64 for float64 inputs); ``"bf16"`` runs them in bfloat16 (the backends accumulate
    in float32; each logit and logit gradient is rounded to bfloat16 once), while the
    log-sum-exps, running maxima, shifts and all reductions stay in the inputs' precision.

    ``groups`` (``[B]`` ids, the rows of all modalities): leave out every entry whose rows all
    lie in one group (:mod:`mmalign.objectives.symile_n2_blocks`); ``out[m, v]`` is then the
    log-sum-exp over the candidates that are not positives of row ``v`` (``-inf`` if none),
    with ``torch.arange(B)`` over all candidates but ``v``'s own tuple.
    """
    if block_size < 1:
        raise ValueError(f"model.objective.block_size must be >= 1, got {block_size}")
    if block_precision not in PRECISIONS:
        raise ValueError(
            f"model.objective.block_precision must be one of {sorted(PRECISIONS)}, "
            f"got {block_precision!r}"
        )
    if anchor.dtype in (torch.float16, torch.bfloat16):  # sums of B^(M-1) exps need float32
        anchor, others = anchor.float(), [other.float() for other in others]
    with torch.autocast(anchor.device.type, enabled=False):
        low = PRECISIONS[block_precision]
        if groups is None:
            return _SymileLogSumExp.apply(block_size, low, None, anchor, *others)
        order = torch.argsort(groups, stable=True)  # groups as row ranges, for the blocks
        rows = [anchor[order], *(other[order] for other in others)]
        lse = _SymileLogSumExp.apply(block_size, low, groups[order], *rows)
        return lse[:, torch.argsort(order)]
