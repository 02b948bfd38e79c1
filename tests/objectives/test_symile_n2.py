"""The blockwise Symile n2 log-sum-exps equal the naive B^M formula (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from mmalign.objectives.symile_n2 import symile_logsumexp
from mmalign.objectives.symile_n2_blocks import Workspace


def _naive(anchor, others):
    tensors = [anchor, *others]
    letters = "ijklm"[: len(tensors)]
    expression = ",".join(f"{c}d" for c in letters) + "->" + letters
    full = torch.einsum(expression, *tensors)
    axes = range(len(tensors))
    return torch.stack(
        [full.logsumexp(dim=tuple(a for a in axes if a != anchor_axis)) for anchor_axis in axes]
    )


def _inputs(count, rows, dim, scale=4.0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        F.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=-1)
        for _ in range(count)
    ]
    tensors[0] = tensors[0] * scale
    return [tensor.requires_grad_() for tensor in tensors]


@pytest.mark.parametrize(
    ("count", "rows", "block_size"),
    [(2, 7, 3), (3, 5, 1), (3, 7, 21), (3, 9, 81), (3, 6, 1000), (4, 5, 15), (4, 3, 2)],
)
def test_blockwise_equals_naive_values_and_gradients(count, rows, block_size):
    tensors = _inputs(count, rows, dim=4)
    upstream = torch.randn(count, rows, dtype=torch.float64)
    ours = symile_logsumexp(tensors[0], tensors[1:], block_size=block_size)
    naive = _naive(tensors[0], tensors[1:])
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    ours_grads = torch.autograd.grad((ours * upstream).sum(), tensors)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), tensors)
    for mine, reference in zip(ours_grads, naive_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("scale", "bounded"), [(4.0, True), (100.0, False)])
def test_forward_shifts_by_the_column_bound_where_tight_else_by_the_column_max(scale, bounded):
    """float32: each column's shift is its |logit| bound where the bound is tight, its maximum
    otherwise; the bound holds, and both ways match float64."""
    tensors = _inputs(3, 6, dim=3, scale=scale, dtype=torch.float32, seed=2)
    anchor, *others = (tensor.detach() for tensor in tensors)
    workspace = Workspace(anchor, others, prefixes_per_block=2, low=None)
    for block in workspace.blocks():
        bound = workspace.column_bound(block)
        assert (bound is not None) == bounded
        if bound is not None:
            for tile in workspace.tiles(block):
                products = workspace.form_products(block, tile)
                assert ((anchor @ products.T).abs() <= bound[tile.columns]).all()
    ours = symile_logsumexp(tensors[0], tensors[1:], block_size=12)
    naive = _naive(anchor.double(), [other.double() for other in others])
    torch.testing.assert_close(ours.double(), naive, rtol=1e-6, atol=1e-5)


def test_float32_with_a_wide_logit_range_stays_exact():
    """Logits spanning far more than float32's exp range (the exactly-recomputed rows of the
    forward and backward passes): float32 results match float64 ones."""
    tensors = _inputs(3, 6, dim=3, scale=100.0, dtype=torch.float32, seed=1)
    with torch.no_grad():
        tensors[0][0] *= 3.0  # one anchor row with logits up to ~300
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    upstream = torch.rand(3, 6, dtype=torch.float64)
    ours = symile_logsumexp(tensors[0], tensors[1:], block_size=5)
    naive = _naive(doubles[0], doubles[1:])
    torch.testing.assert_close(ours.double(), naive, rtol=1e-5, atol=1e-4)
    ours_grads = torch.autograd.grad((ours * upstream.float()).sum(), tensors)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), doubles)
    for mine, reference in zip(ours_grads, naive_grads, strict=True):
        torch.testing.assert_close(mine.double(), reference, rtol=1e-4, atol=1e-4)


def test_block_size_must_be_positive():
    tensors = _inputs(3, 2, dim=2)
    with pytest.raises(ValueError, match=r"model\.objective\.block_size must be >= 1"):
        symile_logsumexp(tensors[0], tensors[1:], block_size=0)
