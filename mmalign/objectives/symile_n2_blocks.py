"""The blocks and tiles of the exact Symile ``n2`` pass (:mod:`mmalign.objectives.symile_n2`):
buffers reused by every tile, each tile's candidate products and logits, and the same-group
mask.

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
``n_g``, a fraction ``(n_g / B)^(M-1)`` of all entries), memory stays ``O(block * d)`` and a
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

TILE_FLOATS = 1 << 18
"""Logits per tile on CPU (1 MiB in float32, half a core's L2 cache). A tile is every anchor
row times a run of a block's candidate columns: its products, matmul, shift, exponential, sums,
gradient factor and both gradient matmuls run while it is in cache, so no ``B x block`` matrix
is ever written to or read back from memory (and a tile's gradient matmuls run faster than one
over the whole block's transposed logits). On other devices a tile is the whole block: there
each kernel launch costs more than the memory passes that small tiles save."""


@dataclass
class Block:
    """One block of candidates: prefixes ``start .. stop - 1`` times every last-axis row."""

    indices: list[Tensor]
    """Row index of each prefix modality for the block's prefixes."""
    prefix: Tensor
    """``[q, d]`` products of the prefix modalities (ones when M = 2)."""
    candidates: int
    """``q * B``: candidate ``p * B + k`` has the product ``prefix[p] * E_{M-1}[k]``."""
    masked: list[tuple[int, int, int, int]] = field(default_factory=list)
    """With groups: boxes ``(s_g, e_g, first, stop)`` to mask, rows and last-axis rows
    ``[s_g, e_g)`` of the block's prefixes ``[first, stop)`` (block-local)."""


@dataclass
class Tile:
    """Candidate columns ``start .. stop - 1`` of a block: prefixes ``[first, last)`` (local to
    the block) times last-axis rows ``[low, high)``; several whole prefixes, or one prefix's
    run of last-axis rows. It carries its views of the workspace's buffers, made once."""

    start: int
    stop: int
    first: int
    last: int
    low: int
    high: int
    products: Tensor
    """``[T, d]`` the tile's candidate products, in the matmul dtype (formed by
    :meth:`Workspace.form_products` in a buffer every tile reuses)."""
    full_products: Tensor
    """``[T, d]`` the same in full precision (bf16 blocks round these; otherwise the same
    tensor as ``products``)."""
    logits: Tensor
    """``[B, T]`` the matmul's output: the full-precision tile, or the bf16 one."""
    full: Tensor
    """``[B, T]`` the full-precision tile."""
    factor: Tensor | None
    """``[B, T]`` the backward's gradient factor."""
    grad_products: Tensor | None
    """``[T, d]`` ``d loss / d products`` of the tile's candidates (full precision; one
    buffer reused by every tile)."""
    low_grad_products: Tensor | None
    """``[T, d]`` bf16 blocks: the bf16 result of the products' gradient matmul."""

    @property
    def columns(self) -> slice:
        return slice(self.start, self.stop)


class Workspace:
    """Buffers reused by every block and tile (no per-block or per-tile allocations).

    The candidate products and the logits exist one tile at a time (:data:`TILE_FLOATS`), so
    the memory is ``O(B * d + tile)`` whatever the block size. bf16 (``low``): the products
    and the anchor are bf16, each tile's matmul writes a bf16 tile (the backend accumulates in
    float32) that is converted into the full-precision tile everything after it reads.
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
        on_cpu = anchor.device.type == "cpu"
        self.tile_width = min(candidates, max(1, TILE_FLOATS // rows)) if on_cpu else candidates
        self.matmul_anchor = anchor if low is None else anchor.to(low)
        self.full_products = anchor.new_empty(self.tile_width, dim)
        self.low_products = None if low is None else self.full_products.to(low)
        tile_size = rows * self.tile_width
        self.tile = anchor.new_empty(tile_size)
        self.low_tile = None if low is None else anchor.new_empty(tile_size, dtype=low)
        self.backward = backward
        if backward:
            self.factor = anchor.new_empty(tile_size)
            self.grad_products = anchor.new_empty(self.tile_width, dim)
            if low is not None:
                self.low_grad_products = anchor.new_empty(self.tile_width, dim, dtype=low)
        self._tiles: dict[int, list[Tile]] = {}

    def blocks(self) -> Iterator[Block]:
        """This rank's blocks."""
        start, stop = rank_range(self.rows ** (len(self.others) - 1))
        for begin in range(start, stop, self.prefixes_per_block):
            end = min(begin + self.prefixes_per_block, stop)
            indices = prefix_indices(begin, end, self.rows, len(self.others) - 1, self.anchor)
            prefix = prefix_products(self.others[:-1], indices, end - begin, self.anchor)
            candidates = (end - begin) * self.rows
            yield Block(indices, prefix, candidates, self._masked_entries(indices))

    def tiles(self, block: Block) -> list[Tile]:
        """The block's tiles, in column order: whole prefixes where a tile holds ``B``
        columns or more, else runs of one prefix's last-axis rows."""
        prefixes = block.prefix.shape[0]
        if prefixes not in self._tiles:
            rows, width = self.rows, self.tile_width
            if width >= rows:
                step = width // rows
                shapes = [(p, min(p + step, prefixes), 0, rows) for p in range(0, prefixes, step)]
            else:
                shapes = [
                    (p, p + 1, k, min(k + width, rows))
                    for p in range(prefixes)
                    for k in range(0, rows, width)
                ]
            self._tiles[prefixes] = [self._tile(*shape) for shape in shapes]
        return self._tiles[prefixes]

    def _tile(self, first: int, last: int, low: int, high: int) -> Tile:
        start, stop = first * self.rows + low, (last - 1) * self.rows + high
        width = stop - start
        shape = (self.rows, width)
        full_products = self.full_products[:width]
        full = self.tile[: shape[0] * shape[1]].view(shape)
        logits = full if self.low_tile is None else self.low_tile[: full.numel()].view(shape)
        backward, bf16 = self.backward, self.low_tile is not None
        return Tile(
            start,
            stop,
            first,
            last,
            low,
            high,
            products=full_products if self.low_products is None else self.low_products[:width],
            full_products=full_products,
            logits=logits,
            full=full,
            factor=self.factor[: full.numel()].view(shape) if backward else None,
            grad_products=self.grad_products[: stop - start] if backward else None,
            low_grad_products=self.low_grad_products[: stop - start] if backward and bf16 else None,
        )

    def split(self, vector: Tensor, block: Block) -> tuple[Tensor, ...]:
        """A ``[q * B]`` per-candidate vector of the block cut into its tiles' pieces."""
        return vector.split([tile.stop - tile.start for tile in self.tiles(block)])

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

    def mask_same_group(
        self, logits: Tensor, block: Block, tile: Tile | None, rows: Tensor | None = None
    ) -> None:
        """Set to ``-inf`` (in place) the entries of ``logits`` (the anchor rows selected by the
        mask ``rows``, default all, times the tile's columns, or the whole block's with
        ``tile=None``) whose tuple rows all lie in the anchor row's group."""
        if not block.masked:
            return
        first, last, low, high = (
            (0, block.prefix.shape[0], 0, self.rows)
            if tile is None
            else (tile.first, tile.last, tile.low, tile.high)
        )
        grid = logits.view(logits.shape[0], last - first, high - low)
        before = None if rows is None else [0, *rows.cumsum(0).tolist()]  # selected rows < r
        for start, stop, box_first, box_last in block.masked:
            prefixes = slice(max(box_first, first) - first, min(box_last, last) - first)
            columns = slice(max(start, low) - low, min(stop, high) - low)
            if prefixes.start >= prefixes.stop or columns.start >= columns.stop:
                continue
            if before is not None:
                start, stop = before[start], before[stop]
            grid[start:stop, prefixes, columns] = float("-inf")

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

    def form_products(self, block: Block, tile: Tile) -> Tensor:
        """The tile's candidate products ``prefix[p] * E_{M-1}[k]`` (a broadcast), in the
        matmul dtype, in the reused buffer."""
        torch.mul(
            block.prefix[tile.first : tile.last, None, :],
            self.others[-1][None, tile.low : tile.high, :],
            out=tile.full_products.view(tile.last - tile.first, tile.high - tile.low, -1),
        )
        if tile.products is not tile.full_products:
            tile.products.copy_(tile.full_products)
        return tile.products

    def tile_logits(self, block: Block, tile: Tile) -> Tensor:
        """``anchor @ products[tile].T`` with the same-group entries at ``-inf``, ``[B, T]`` in
        the matmul dtype, in the reused tile buffer (the tile's products formed first)."""
        self.form_products(block, tile)
        torch.mm(self.matmul_anchor, tile.products.T, out=tile.logits)
        self.mask_same_group(tile.logits, block, tile)
        return tile.logits

    def exp_tile(self, tile: Tile, shift: Tensor) -> Tensor:
        """``exp(logits - shift[c])`` in full precision, over the tile buffer (in cache)."""
        if self.low_tile is not None:
            tile.full.copy_(tile.logits)
        return tile.full.sub_(shift).exp_()

    def row_logits(self, rows: Tensor, block: Block, tile: Tile | None = None) -> Tensor:
        """Full-precision logits of the selected anchor ``rows`` over the tile's columns
        (default: the whole block, tile by tile, forming each tile's products), for the exact
        fallbacks."""
        if tile is None:
            parts = []
            for part in self.tiles(block):
                self.form_products(block, part)
                parts.append(self.row_logits(rows, block, part))
            return torch.cat(parts, dim=1)
        logits = (self.matmul_anchor[rows] @ tile.products.T).to(self.anchor.dtype)
        self.mask_same_group(logits, block, tile, rows)
        return logits

    def gradient_matmuls(self, tile: Tile, grad_anchor: Tensor) -> Tensor:
        """With ``d loss / d logits`` in ``tile.full`` (and the tile's products still formed):
        add ``grad @ products[tile]`` to ``grad_anchor``; return ``grad.T @ anchor`` (``[T,
        d]``, in ``tile.grad_products``)."""
        assert tile.grad_products is not None
        if tile.low_grad_products is None:
            grad_anchor.addmm_(tile.full, tile.products)
            return torch.mm(tile.full.T, self.anchor, out=tile.grad_products)
        low = tile.logits.copy_(tile.full)
        grad_anchor += low @ tile.products
        low_grad_products = torch.mm(low.T, self.matmul_anchor, out=tile.low_grad_products)
        return tile.grad_products.copy_(low_grad_products)


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
