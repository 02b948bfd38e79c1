"""The blocks of the exact Symile ``n2`` pass (:mod:`mmalign.objectives.symile_n2`): buffers
reused by every block, each block's candidate products and logits, and the same-group mask.

A block holds the candidates ``c = p * B + k`` of ``q`` consecutive prefixes ``p = (i_1, ...,
i_{M-2})`` times every last-axis row ``k``. With ``groups`` (one id per row of the global
batch) the pass leaves out every entry ``T[i_0, ..., i_{M-1}]`` whose rows all lie in one
group: for anchor ``m`` and row ``v = i_m`` these are exactly the candidate tuples that are
positives of ``v`` (``positives: exclude``), the same set for every anchor. The rows come
sorted by group (:func:`mmalign.objectives.symile_n2.symile_logsumexp` permutes them), so
group ``g`` is a range ``[s_g, e_g)`` of rows: the masked entries of a run of consecutive
prefixes whose rows all lie in ``g`` form one strided box, anchor rows ``[s_g, e_g)`` x those
prefixes x last-axis rows ``[s_g, e_g)``, written ``-inf`` in one slice assignment. The work is
proportional to the masked entries (``sum_g n_g^M`` over the whole pass for groups of sizes
``n_g``, a fraction ``(n_g / B)^(M-1)`` of all entries), memory stays ``O(B * block)`` and a
block without such prefix costs nothing extra. A masked entry is ``-inf`` in the forward pass
and gets no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmalign.dist import rank, world_size


@dataclass
class Block:
    """One block of candidates: prefixes ``start .. stop - 1`` times every last-axis row."""

    indices: list[Tensor]
    """Row index of each prefix modality for the block's prefixes."""
    prefix: Tensor
    """``[q, d]`` products of the prefix modalities (ones when M = 2)."""
    products: Tensor
    """``[q * B, d]`` candidate products, candidate ``p * B + k``, in the matmul dtype."""
    shift_column: Tensor
    """The spare column beside ``products`` that carries ``-shift`` into the matmul."""
    masked: list[tuple[int, int, int, int]] = field(default_factory=list)
    """With groups: boxes ``(s_g, e_g, first, stop)`` to mask, rows and last-axis rows
    ``[s_g, e_g)`` of the block's prefixes ``[first, stop)`` (block-local)."""


class Workspace:
    """Buffers reused by every block (no per-block allocations of ``B x block`` tensors).

    ``products`` lives in a ``[block, d + 1]`` buffer (in the matmul dtype) whose last column
    and the anchor's extra column of ones let one full-precision matmul return ``logits -
    shift`` (no separate subtraction pass). bf16 (``low``): the products and the anchor are
    bf16, the matmul writes a bf16 buffer (the backend accumulates in float32, the last column
    stays zero) and one conversion pass copies it into the full-precision logits that
    everything after it reads.
    """

    def __init__(
        self,
        anchor: Tensor,
        others: list[Tensor],
        prefixes_per_block: int,
        low: torch.dtype | None,
        groups: Tensor | None = None,
        backward: bool = False,
    ) -> None:
        rows, dim = anchor.shape
        self.anchor, self.others, self.rows, self.low = anchor, others, rows, low
        self.groups = groups  # sorted
        if groups is not None:
            _, self.group_of, sizes = torch.unique_consecutive(
                groups, return_inverse=True, return_counts=True
            )
            self.bounds = [0, *sizes.cumsum(0).tolist()]  # group g: rows bounds[g]..bounds[g+1]
        self.prefixes_per_block = prefixes_per_block
        last = others[-1]
        self.anchor_norm = anchor.norm(dim=1).max()
        self.last_norms = last.norm(dim=1), last.abs().amax(dim=1)
        candidates = prefixes_per_block * rows
        dtype = anchor.dtype if low is None else low
        self.logits = anchor.new_empty(rows, candidates)
        self.matmul_anchor = torch.cat([anchor, anchor.new_ones(rows, 1)], dim=1).to(dtype)
        self.augmented = anchor.new_empty(candidates, dim + 1, dtype=dtype)
        self.augmented[:, -1] = 0.0  # bf16 blocks keep the shift out of the matmul
        self.products = self.augmented[:, :dim]
        if backward:
            self.factor = torch.empty_like(self.logits)
            self.grad_products = anchor.new_empty(candidates, dim)
        if low is not None:
            self.low_anchor = anchor.to(low)
            self.low_logits = anchor.new_empty(rows, candidates, dtype=low)
            if backward:
                self.low_products = anchor.new_empty(candidates, dim, dtype=low)

    def blocks(self) -> Iterator[Block]:
        """This rank's blocks, each with its products filled in."""
        start, stop = rank_range(self.rows ** (len(self.others) - 1))
        for begin in range(start, stop, self.prefixes_per_block):
            end = min(begin + self.prefixes_per_block, stop)
            indices = prefix_indices(begin, end, self.rows, len(self.others) - 1, self.anchor)
            prefix = prefix_products(self.others[:-1], indices, end - begin, self.anchor)
            candidates = (end - begin) * self.rows
            products = self.products[:candidates]
            torch.mul(
                prefix[:, None, :],
                self.others[-1][None, :, :],
                out=products.view(end - begin, self.rows, -1),
            )
            shift = self.augmented[:candidates, -1]
            yield Block(indices, prefix, products, shift, self._masked_entries(indices))

    def _masked_entries(self, indices: list[Tensor]) -> list[tuple[int, int, int, int]]:
        """The block's boxes: one per run of consecutive prefixes whose rows lie in one group
        (with M = 2, the one empty prefix lies in every group)."""
        if self.groups is None:
            return []
        bounds = self.bounds
        if not indices:
            return [(bounds[g], bounds[g + 1], 0, 1) for g in range(len(bounds) - 1)]
        key = self.group_of[indices[0]]
        for index in indices[1:]:
            key = torch.where(self.group_of[index] == key, key, -1)
        values, counts = torch.unique_consecutive(key, return_counts=True)
        boxes, first = [], 0
        for group, count in zip(values.tolist(), counts.tolist()):
            if group >= 0:
                boxes.append((bounds[group], bounds[group + 1], first, first + count))
            first += count
        return boxes

    def mask_same_group(self, logits: Tensor, block: Block, rows: Tensor | None = None) -> None:
        """Set to ``-inf`` (in place) the entries of ``logits`` (the anchor rows selected by the
        mask ``rows``, default all, times the block's columns) whose tuple rows all lie in the
        anchor row's group."""
        if not block.masked:
            return
        grid = logits.view(logits.shape[0], -1, self.rows)
        before = None if rows is None else [0, *rows.cumsum(0).tolist()]  # selected rows < r
        for start, stop, first, last in block.masked:
            low, high = (start, stop) if before is None else (before[start], before[stop])
            grid[low:high, first:last, start:stop] = float("-inf")

    def column_bound(self, block: Block) -> Tensor | None:
        """An upper bound on each column's ``|logit|`` (Cauchy-Schwarz and Hoelder:
        ``|<x, p * z>| <= |x|_2 min(|p|_inf |z|_2, |p|_2 |z|_inf)``), or ``None`` where it is too
        loose to shift by: beyond half the exponent range, ``exp(logit - bound)`` of a column's
        largest logit could lose precision."""
        two, infinity = self.last_norms
        prefix = block.prefix
        bound = torch.minimum(
            prefix.abs().amax(dim=1)[:, None] * two, prefix.norm(dim=1)[:, None] * infinity
        ).mul_(self.anchor_norm)
        if 2 * float(bound.max()) > -0.5 * math.log(torch.finfo(self.anchor.dtype).tiny):
            return None
        return bound.view(-1)

    def column_shifted_logits(self, block: Block) -> tuple[Tensor, Tensor]:
        """``logits - shift`` in the full-precision logits buffer, and the column ``shift``: the
        column's bound (:meth:`column_bound`, carried into the matmul, no pass over the block)
        where it is tight enough, else the column's maximum."""
        bound = self.column_bound(block)
        if bound is not None:
            return self.shifted_logits(block, bound), bound
        logits = self.shifted_logits(block, self.anchor.new_zeros(block.products.shape[0]))
        column_max = _finite(logits.amax(dim=0))
        return logits.sub_(column_max), column_max

    def shifted_logits(self, block: Block, shift: Tensor) -> Tensor:
        """``logits - shift[c]`` for a shift known before the matmul, in the logits buffer: in
        full precision the shift rides in the matmul; bf16 blocks subtract it in full precision
        after the conversion (a bf16 matmul would round ``logits - shift``, coarser than the
        logits where the shift is far from them), with no temporary."""
        candidates = block.products.shape[0]
        logits = self.logits[:, :candidates]
        augmented = self.augmented[:candidates].T
        if self.low is None:
            block.shift_column.copy_(shift).neg_()
            torch.mm(self.matmul_anchor, augmented, out=logits)
        else:
            low = torch.mm(self.matmul_anchor, augmented, out=self.low_logits[:, :candidates])
            logits.copy_(low).sub_(shift)
        self.mask_same_group(logits, block)
        return logits

    def row_logits(self, rows: Tensor, block: Block) -> Tensor:
        """Full-precision logits of the selected anchor ``rows`` (the exact fallbacks)."""
        anchor = self.matmul_anchor[:, : self.anchor.shape[1]]
        logits = (anchor[rows] @ block.products.T).to(self.anchor.dtype)
        self.mask_same_group(logits, block, rows)
        return logits

    def gradient_matmuls(self, grad_logits: Tensor, block: Block, grad_anchor: Tensor) -> Tensor:
        """Add ``grad_logits @ products`` to ``grad_anchor``; return ``grad_logits.T @ anchor``
        (``[q * B, d]``, full precision, in a reused buffer)."""
        candidates = grad_logits.shape[1]
        grad_products = self.grad_products[:candidates]
        if self.low is None:
            grad_anchor.addmm_(grad_logits, block.products)
            return torch.mm(grad_logits.T, self.anchor, out=grad_products)
        low = self.low_logits[:, :candidates].copy_(grad_logits)
        grad_anchor += low @ block.products
        low_products = torch.mm(low.T, self.low_anchor, out=self.low_products[:candidates])
        return grad_products.copy_(low_products)


def _finite(column_max: Tensor) -> Tensor:
    """A fully masked column's maximum (``-inf``) becomes the dtype's lowest finite value, so
    that ``logits - column_max`` stays ``-inf`` there (not NaN)."""
    return column_max.clamp_(min=torch.finfo(column_max.dtype).min)


def prefix_indices(start: int, stop: int, rows: int, count: int, like: Tensor) -> list[Tensor]:
    prefixes = torch.arange(start, stop, device=like.device)
    return [(prefixes // rows ** (count - 1 - m)) % rows for m in range(count)]


def prefix_products(
    modalities: list[Tensor], indices: list[Tensor], count: int, like: Tensor, skip: int = -1
) -> Tensor:
    product = like.new_ones(count, like.shape[1])
    for m, (embedding, index) in enumerate(zip(modalities, indices)):
        if m != skip:
            product = product * embedding.index_select(0, index)
    return product


def rank_range(total: int) -> tuple[int, int]:
    size, index = world_size(), rank()
    return index * total // size, (index + 1) * total // size
