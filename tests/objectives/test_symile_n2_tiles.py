"""Tiles of every shape inside a Symile ``n2`` block (one prefix's run of last-axis rows,
exactly one prefix, several prefixes, a ragged last tile) give the naive values and gradients,
with same-group masks cut across tiles, the column-max fallback's running top, and bf16."""

import pytest
import torch

from mmalign.objectives import symile_n2_blocks
from mmalign.objectives.symile_n2 import symile_logsumexp
from mmalign.objectives.symile_n2_blocks import Workspace
from tests.objectives.test_symile_n2 import _inputs, _naive
from tests.objectives.test_symile_n2_bf16 import BF16_RELATIVE, _largest_abs_mip

ROWS = 7
WIDTHS = [1, 3, ROWS, 2 * ROWS, 3 * ROWS]  # 3: splits a prefix; 3 * ROWS: ragged last tile


def _tiled(monkeypatch, width, *args, **kwargs):
    monkeypatch.setattr(symile_n2_blocks, "TILE_FLOATS", ROWS * width)
    return symile_logsumexp(*args, **kwargs)


def _gradients(values, tensors, seed=0):
    upstream = torch.rand(values.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((values * upstream.to(values.dtype)).sum(), tensors)


def test_tiles_cover_each_block_once_in_column_order(monkeypatch):
    tensors = [t.detach() for t in _inputs(3, ROWS, dim=4)]
    for width in WIDTHS:
        monkeypatch.setattr(symile_n2_blocks, "TILE_FLOATS", ROWS * width)
        workspace = Workspace(tensors[0], tensors[1:], prefixes_per_block=5, low=None)
        for block in workspace.blocks():
            tiles = workspace.tiles(block)
            assert [t.start for t in tiles] == [0, *(t.stop for t in tiles[:-1])]
            assert tiles[-1].stop == block.candidates
            for tile in tiles:
                assert tile.stop - tile.start == (tile.last - tile.first) * (tile.high - tile.low)
                assert tile.stop - tile.start <= max(width, 1)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("count", [2, 3, 4])
def test_any_tile_width_equals_naive(monkeypatch, width, count):
    tensors = _inputs(count, ROWS, dim=4)
    ours = _tiled(monkeypatch, width, tensors[0], tensors[1:], block_size=5 * ROWS)
    naive = _naive(tensors[0], tensors[1:])
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    for mine, reference in zip(_gradients(ours, tensors), _gradients(naive, tensors), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("count", [2, 3])
def test_same_group_masks_cut_across_tiles_equal_one_tile(monkeypatch, width, count):
    """Groups of sizes 3, 1, 2, 1: the masked boxes span tile edges; tiled equals one tile per
    block (itself checked against the dense reference in test_positives.py)."""
    tensors = _inputs(count, ROWS, dim=4, seed=3)
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 3])
    ours = _tiled(monkeypatch, width, tensors[0], tensors[1:], block_size=5 * ROWS, groups=groups)
    whole = _tiled(
        monkeypatch, 5 * ROWS, tensors[0], tensors[1:], block_size=5 * ROWS, groups=groups
    )
    assert torch.isinf(ours).sum() == torch.isinf(whole).sum()
    torch.testing.assert_close(ours, whole, rtol=1e-12, atol=1e-12)
    finite = torch.where(torch.isinf(ours), 0.0, ours)
    finite_whole = torch.where(torch.isinf(whole), 0.0, whole)
    for mine, reference in zip(
        _gradients(finite, tensors), _gradients(finite_whole, tensors), strict=True
    ):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("width", [1, 3, 2 * ROWS])
def test_column_max_fallback_with_a_running_top_stays_exact(monkeypatch, width):
    """float32 logits up to ~300 (the column bound is too loose, so each tile shifts by its
    column maxima and the row sums are rescaled as the running top grows): float64 results."""
    tensors = _inputs(3, ROWS, dim=3, scale=100.0, dtype=torch.float32, seed=1)
    with torch.no_grad():
        tensors[0][0] *= 3.0
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    ours = _tiled(monkeypatch, width, tensors[0], tensors[1:], block_size=2 * ROWS)
    naive = _naive(doubles[0], doubles[1:])
    torch.testing.assert_close(ours.double(), naive, rtol=1e-5, atol=1e-4)
    for mine, reference in zip(_gradients(ours, tensors), _gradients(naive, doubles), strict=True):
        torch.testing.assert_close(mine.double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [3, 2 * ROWS])
def test_bf16_tiles_stay_within_the_rounding_bound(monkeypatch, width):
    tensors = _inputs(3, ROWS, dim=16, scale=10.0, dtype=torch.float32, seed=4)
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    ours = _tiled(
        monkeypatch, width, tensors[0], tensors[1:], block_size=5 * ROWS, block_precision="bf16"
    )
    naive = _naive(doubles[0], doubles[1:])
    bound = BF16_RELATIVE * _largest_abs_mip(doubles[0], doubles[1:]).item()
    assert (ours.double() - naive).abs().max().item() <= bound
    for mine, reference in zip(_gradients(ours, tensors), _gradients(naive, doubles), strict=True):
        assert ((mine.double() - reference).norm() / reference.norm()).item() <= 2e-2
