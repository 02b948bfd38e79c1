"""``block_precision: bf16``: the block matmuls in bfloat16, everything else in full precision.

Tolerances, and where they come from: a bf16 block logit is ``sum_d a_d p_d`` with ``a`` and
``p`` each rounded to bf16 (relative error <= 2^-9 each) and the float32-accumulated sum
rounded to bf16 once more, so ``|dL| <= 3 * 2^-9 * sum_d |a_d p_d|`` (plus second-order terms);
a log-sum-exp is a weighted mean of its logits, so its error is at most the largest ``|dL|``.
Gradients have no such closed bound (the gradient matmuls round ``dT`` too); their tolerance
is a relative-norm bound of 2e-2, about twice the largest error seen at these sizes.
"""

import pytest
import torch

from mmalign.config import load_config
from mmalign.objectives import build_objective
from mmalign.objectives.symile_n2 import symile_logsumexp
from tests.objectives.test_symile_n2 import _inputs, _naive

BF16_RELATIVE = 3.1 * 2.0**-9


def _largest_abs_mip(anchor, others):
    tensors = [anchor.abs(), *(o.abs() for o in others)]
    letters = "ijklm"[: len(tensors)]
    expression = ",".join(f"{c}d" for c in letters) + "->" + letters
    return torch.einsum(expression, *tensors).max()


@pytest.mark.parametrize(("count", "rows", "scale"), [(2, 9, 10.0), (3, 7, 10.0), (3, 8, 100.0)])
def test_bf16_blocks_stay_within_the_rounding_bound_of_float64(count, rows, scale):
    tensors = _inputs(count, rows, dim=16, scale=scale, dtype=torch.float32, seed=count)
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    upstream = torch.rand(
        count, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ours = symile_logsumexp(tensors[0], tensors[1:], block_size=2 * rows, block_precision="bf16")
    naive = _naive(doubles[0], doubles[1:])
    bound = BF16_RELATIVE * _largest_abs_mip(doubles[0], doubles[1:]).item()
    assert (ours.double() - naive).abs().max().item() <= bound
    ours_grads = torch.autograd.grad((ours * upstream.float()).sum(), tensors)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), doubles)
    for mine, reference in zip(ours_grads, naive_grads, strict=True):
        relative = (mine.double() - reference).norm() / reference.norm()
        assert relative.item() <= 2e-2


def test_bf16_blocks_really_round_and_fp32_blocks_do_not():
    """The bf16 result differs from the fp32 one (the matmuls ran in bf16) by less than the
    bound; fp32 blocks on float32 inputs match float64 to float32 accuracy."""
    tensors = _inputs(3, 6, dim=32, scale=10.0, dtype=torch.float32, seed=5)
    doubles = [t.detach().double() for t in tensors]
    full = symile_logsumexp(tensors[0], tensors[1:], block_size=12)
    low = symile_logsumexp(tensors[0], tensors[1:], block_size=12, block_precision="bf16")
    torch.testing.assert_close(full.double(), _naive(doubles[0], doubles[1:]), rtol=1e-6, atol=1e-6)
    bound = BF16_RELATIVE * _largest_abs_mip(doubles[0], doubles[1:]).item()
    assert 0.0 < (low - full).abs().max().item() <= bound


def test_bf16_wide_logit_range_uses_the_exact_fallbacks_within_the_bound():
    """Logits up to ~300 (the forward's inexact rows and the backward's exact rows run):
    values stay within the bf16 rounding bound of float64 (here 1.2 on log-sum-exps near 300).
    That bound allows softmax weights to move by a factor ``exp(2.4)``, too loose to test
    gradients with, so they get an empirical 0.1 relative tolerance (0.024 to 0.058 measured:
    bf16 blocks are no place for logits of hundreds)."""
    tensors = _inputs(3, 6, dim=3, scale=100.0, dtype=torch.float32, seed=1)
    with torch.no_grad():
        tensors[0][0] *= 3.0
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    ours = symile_logsumexp(tensors[0], tensors[1:], block_size=5, block_precision="bf16")
    naive = _naive(doubles[0], doubles[1:])
    bound = BF16_RELATIVE * _largest_abs_mip(doubles[0], doubles[1:]).item()
    assert (ours.double() - naive).abs().max().item() <= bound
    upstream = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours_grads = torch.autograd.grad((ours * upstream.float()).sum(), tensors)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), doubles)
    for mine, reference in zip(ours_grads, naive_grads, strict=True):
        relative = (mine.double() - reference).norm() / reference.norm()
        assert relative.item() <= 0.1


def test_fp32_blocks_ignore_an_enclosing_bf16_autocast():
    tensors = _inputs(3, 5, dim=8, scale=10.0, dtype=torch.float32, seed=2)
    plain = symile_logsumexp(tensors[0], tensors[1:], block_size=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = symile_logsumexp(tensors[0], tensors[1:], block_size=10)
    assert torch.equal(plain, inside)


def test_symile_objective_loss_with_bf16_blocks_is_close_to_fp32():
    generator = torch.Generator().manual_seed(3)
    embeddings = {
        m: torch.nn.functional.normalize(torch.randn(12, 32, generator=generator), dim=-1)
        for m in ("a", "b", "c")
    }
    scale = torch.tensor(20.0)
    losses = {
        precision: build_objective(
            {"name": "symile", "negatives": "n2", "block_precision": precision}
        )(embeddings, scale).loss.item()
        for precision in ("fp32", "bf16")
    }
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-3)
    assert losses["bf16"] != losses["fp32"]


def _config(*overrides):
    towers = {m: {"type": "tabular", "in_features": 3} for m in ("a", "b", "c")}
    objective = {"name": "symile", "negatives": "n2"}
    return load_config({"model": {"towers": towers, "objective": objective}}, list(overrides))


def test_block_precision_follows_train_precision_unless_set():
    assert _config().model.objective.block_precision == "fp32"
    assert _config("train.precision=fp16").model.objective.block_precision == "fp32"
    assert _config("train.precision=bf16").model.objective.block_precision == "bf16"
    explicit = _config("train.precision=bf16", "model.objective.block_precision=fp32")
    assert explicit.model.objective.block_precision == "fp32"
    resolved = explicit.to_dict()
    assert resolved["model"]["objective"]["block_precision"] == "fp32"


def test_unknown_block_precision_is_an_error_naming_the_field():
    with pytest.raises(Exception, match=r"model\.objective\.block_precision"):
        _config("model.objective.block_precision=fp16")
    tensors = _inputs(3, 2, dim=2)
    with pytest.raises(ValueError, match=r"model\.objective\.block_precision must be one of"):
        symile_logsumexp(tensors[0], tensors[1:], block_precision="fp16")
