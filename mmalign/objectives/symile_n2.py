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

The backward pass recomputes each block and forms ``dT = g_0[i] softmax_0 + sum_m g_m[i_m]
softmax_m`` with one exponential per entry, ``exp(L - colmax[c])``, times a rank-one-plus-row
factor (see ``_logit_gradient``) that neither overflows nor underflows. Then ``dE_0 = dT @ P``
and ``dP = dT^T @ E_0``, scattered into the other modalities.
Memory is ``O(B * d + B * block_size)`` (block buffers are reused, not reallocated); time is
four ``B^M * d`` matmul-equivalents.

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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from mmalign.dist import rank, world_size
from mmalign.objectives.distributed import all_reduce_sum


@dataclass
class _Block:
    """One block of candidates: prefixes ``start .. stop - 1`` times every last-axis row."""

    indices: list[Tensor]
    """Row index of each prefix modality for the block's prefixes."""
    prefix: Tensor
    """``[q, d]`` products of the prefix modalities (ones when M = 2)."""
    products: Tensor
    """``[q * B, d]`` candidate products, candidate ``p * B + k``."""


class _Workspace:
    """Buffers reused by every block (no per-block allocations of ``B x block`` tensors)."""

    def __init__(
        self, anchor: Tensor, others: list[Tensor], prefixes_per_block: int, backward: bool = False
    ) -> None:
        rows, dim = anchor.shape
        self.anchor, self.others, self.rows = anchor, others, rows
        self.prefixes_per_block = prefixes_per_block
        self.products = anchor.new_empty(prefixes_per_block * rows, dim)
        self.logits = anchor.new_empty(rows, prefixes_per_block * rows)
        self.factor = torch.empty_like(self.logits) if backward else None

    def blocks(self) -> Iterator[_Block]:
        """This rank's blocks, each with its products filled in."""
        start, stop = _rank_range(self.rows ** (len(self.others) - 1))
        for begin in range(start, stop, self.prefixes_per_block):
            end = min(begin + self.prefixes_per_block, stop)
            indices = _prefix_indices(begin, end, self.rows, len(self.others) - 1, self.anchor)
            prefix = _prefix_products(self.others[:-1], indices, end - begin, self.anchor)
            products = self.products[: (end - begin) * self.rows]
            torch.mul(
                prefix[:, None, :],
                self.others[-1][None, :, :],
                out=products.view(end - begin, self.rows, -1),
            )
            yield _Block(indices, prefix, products)

    def logits_of(self, block: _Block) -> Tensor:
        """``anchor @ products.T`` written into the reused logits buffer."""
        logits = self.logits[:, : block.products.shape[0]]
        return torch.mm(self.anchor, block.products.T, out=logits)


def _prefix_indices(start: int, stop: int, rows: int, count: int, like: Tensor) -> list[Tensor]:
    prefixes = torch.arange(start, stop, device=like.device)
    return [(prefixes // rows ** (count - 1 - m)) % rows for m in range(count)]


def _prefix_products(
    modalities: list[Tensor], indices: list[Tensor], count: int, like: Tensor, skip: int = -1
) -> Tensor:
    product = like.new_ones(count, like.shape[1])
    for m, (embedding, index) in enumerate(zip(modalities, indices)):
        if m != skip:
            product = product * embedding.index_select(0, index)
    return product


def _scatter_logsumexp(values: Tensor, index: Tensor, bins: int) -> Tensor:
    """``out[b] = logsumexp(values[index == b])`` (``-inf`` for empty bins)."""
    top = values.new_full((bins,), float("-inf")).scatter_reduce(0, index, values, "amax")
    sums = values.new_zeros(bins).index_add_(0, index, (values - top[index]).exp())
    return top + sums.log()


def _block_logsumexps(logits: Tensor, anchor: Tensor, products: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of ``logits`` (consumed) with one exponential per entry.

    ``E = exp(L - colmax)`` gives the columns directly; rows are ``log(E @ exp(colmax - top))
    + top``. A row whose sum falls under ``sqrt(tiny)`` (its logits lie far below the block's
    largest) lost precision to underflow and is recomputed exactly.
    """
    column_max = logits.amax(dim=0)
    top = column_max.max()
    scaled = logits.sub_(column_max).exp_()
    columns = scaled.sum(dim=0).log_().add_(column_max)
    row_sums = scaled @ (column_max - top).exp()
    inexact = row_sums < torch.finfo(row_sums.dtype).tiny ** 0.5
    rows = row_sums.log_().add_(top)
    if inexact.any():
        rows[inexact] = (anchor[inexact] @ products.T).logsumexp(dim=1)
    return rows, columns


def _rank_range(total: int) -> tuple[int, int]:
    size, index = world_size(), rank()
    return index * total // size, (index + 1) * total // size


def _combine_ranks(partial: Tensor) -> Tensor:
    if world_size() == 1:
        return partial
    parts = [torch.empty_like(partial) for _ in range(world_size())]
    dist.all_gather(parts, partial.contiguous())
    return torch.stack(parts).logsumexp(dim=0)


def _forward_pass(workspace: _Workspace) -> Tensor:
    rows, count = workspace.rows, len(workspace.others) + 1
    lse = workspace.anchor.new_full((count, rows), float("-inf"))
    for block in workspace.blocks():
        logits = workspace.logits_of(block)
        rows_lse, columns_lse = _block_logsumexps(logits, workspace.anchor, block.products)
        lse[0] = torch.logaddexp(lse[0], rows_lse)
        columns_lse = columns_lse.view(-1, rows)
        lse[-1] = torch.logaddexp(lse[-1], columns_lse.logsumexp(dim=0))
        prefix_lse = columns_lse.logsumexp(dim=1)
        for m, index in enumerate(block.indices, start=1):
            lse[m] = torch.logaddexp(lse[m], _scatter_logsumexp(prefix_lse, index, rows))
    return _combine_ranks(lse)


def _safe_gap(dtype: torch.dtype) -> float:
    """Largest ``top - lse_0[i]`` for which ``exp(colmax - top) * exp(top - lse_0[i])`` loses
    nothing that matters to underflow (the lost terms are below ``tiny ** 0.3``)."""
    return -0.7 * math.log(torch.finfo(dtype).tiny)


def _logit_gradient(workspace: _Workspace, block: _Block, lse: Tensor, grad_lse: Tensor) -> Tensor:
    """``d loss / d logits`` of one block, written over the logits buffer.

    ``dL = g_0[i] exp(L - lse_0[i]) + sum_m g_m[i_m] exp(L - lse_m[i_m])
    = exp(L - colmax[c]) * (a[i] w[c] + h[c])`` with ``w = exp(colmax - top)``,
    ``a = g_0 exp(top - lse_0)`` and ``h = sum_m g_m exp(colmax - lse_m) <= |g|``: one
    exponential per entry. Rows whose ``a`` would overflow are added exactly.
    """
    logits = workspace.logits_of(block)
    rows = logits.shape[0]
    column_max = logits.amax(dim=0)
    top = column_max.max()
    grid = column_max.view(-1, rows)
    column_factor = grad_lse[-1] * (grid - lse[-1]).exp()
    for m, index in enumerate(block.indices, start=1):
        column_factor += grad_lse[m][index, None] * (grid - lse[m][index, None]).exp()
    gap = top - lse[0]
    exact = gap > _safe_gap(logits.dtype)
    row_factor = torch.where(exact, 0.0, grad_lse[0] * gap.clamp(max=_safe_gap(logits.dtype)).exp())
    factor = workspace.factor[:, : logits.shape[1]]
    torch.addr(column_factor.view(1, -1), row_factor, (column_max - top).exp(), out=factor)
    grad = logits.sub_(column_max).exp_().mul_(factor)
    if exact.any():
        exact_logits = workspace.anchor[exact] @ block.products.T
        grad[exact] += grad_lse[0][exact, None] * (exact_logits - lse[0][exact, None]).exp()
    return grad


def _backward_pass(workspace: _Workspace, lse: Tensor, grad_lse: Tensor) -> list[Tensor]:
    anchor, others, rows = workspace.anchor, workspace.others, workspace.rows
    grads = [torch.zeros_like(anchor), *(torch.zeros_like(other) for other in others)]
    grad_products = torch.empty_like(workspace.products)
    for block in workspace.blocks():
        prefixes = block.prefix.shape[0]
        grad_logits = _logit_gradient(workspace, block, lse, grad_lse)
        grads[0].addmm_(grad_logits, block.products)
        grid = torch.mm(grad_logits.T, anchor, out=grad_products[: prefixes * rows])
        grid = grid.view(prefixes, rows, -1)
        grad_prefix = (grid * others[-1][None, :, :]).sum(dim=1)
        grads[-1] += grid.mul_(block.prefix[:, None, :]).sum(dim=0)
        for m, index in enumerate(block.indices):
            rest = _prefix_products(others[:-1], block.indices, prefixes, anchor, skip=m)
            grads[m + 1].index_add_(0, index, grad_prefix * rest)
    return grads


class _SymileLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, block_size: int, anchor: Tensor, *others: Tensor) -> Tensor:
        prefixes_per_block = max(1, block_size // anchor.shape[0])
        lse = _forward_pass(_Workspace(anchor, list(others), prefixes_per_block))
        ctx.prefixes_per_block = prefixes_per_block
        ctx.save_for_backward(lse, anchor, *others)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        lse, anchor, *others = ctx.saved_tensors
        workspace = _Workspace(anchor, others, ctx.prefixes_per_block, backward=True)
        return None, *_backward_pass(workspace, lse, all_reduce_sum(grad_lse))


def symile_logsumexp(anchor: Tensor, others: list[Tensor], block_size: int = 16384) -> Tensor:
    """Every anchor's Symile ``n2`` log-sum-exp, ``[M, B]``, computed in blocks.

    ``out[0, i] = logsumexp over all (j, k, ...) of MIP(anchor[i], others[0][j], others[1][k],
    ...)`` and ``out[m, v]`` the same over every entry whose ``m``-th modality row is ``v``.
    ``anchor`` carries the logit scale; half precision is computed in float32. A block holds
    ``max(1, block_size // B)`` prefixes, that is at least ``B`` candidates. Differentiable in
    every input.
    """
    if block_size < 1:
        raise ValueError(f"model.objective.block_size must be >= 1, got {block_size}")
    if anchor.dtype in (torch.float16, torch.bfloat16):  # sums of B^(M-1) exps need float32
        anchor, others = anchor.float(), [other.float() for other in others]
    return _SymileLogSumExp.apply(block_size, anchor, *others)
