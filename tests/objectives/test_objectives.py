"""Objectives against open_clip and the symile package, missing modalities, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile

from mmalign.objectives import LossOutput, build_objective


def _embeddings(names, rows=6, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)
        .detach()
        .requires_grad_()
        for name in names
    }


def _scale(value=7.0):
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_close_all(first, second):
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_clip_two_modalities_equals_open_clip_value_and_gradients():
    emb, scale = _embeddings(["image", "text"]), _scale()
    ours = build_objective({"name": "clip"})(emb, scale)
    reference = ClipLoss()(emb["image"], emb["text"], scale)
    inputs = [emb["image"], emb["text"], scale]
    torch.testing.assert_close(ours.loss, reference, rtol=1e-12, atol=0)
    _assert_close_all(_grads(ours.loss, inputs), _grads(reference, inputs))
    assert isinstance(ours, LossOutput)
    assert ours.metrics["loss/image-text"] == pytest.approx(reference.item())
    assert ours.metrics["logit_scale"] == pytest.approx(7.0)


def test_sigmoid_two_modalities_equals_open_clip_value_and_gradients():
    emb, scale = _embeddings(["image", "text"]), _scale(10.0)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ours = build_objective({"name": "sigmoid"})(emb, scale, bias)
    reference = SigLipLoss()(emb["image"], emb["text"], scale, bias)
    inputs = [emb["image"], emb["text"], scale, bias]
    torch.testing.assert_close(ours.loss, reference, rtol=1e-12, atol=0)
    _assert_close_all(_grads(ours.loss, inputs), _grads(reference, inputs))
    assert ours.metrics["logit_bias"] == pytest.approx(-3.0)


def test_clip_many_modalities_is_weighted_mean_of_open_clip_pairs():
    emb, scale = _embeddings(["a", "b", "c"]), _scale()
    weights = {"a-b": 2.0, "b-c": 1.0}
    ours = build_objective({"name": "clip", "pairs": [["a", "b"], ["b", "c"]], "weights": weights})
    expected = (
        2 * ClipLoss()(emb["a"], emb["b"], scale) + ClipLoss()(emb["b"], emb["c"], scale)
    ) / 3
    torch.testing.assert_close(ours(emb, scale).loss, expected, rtol=1e-12, atol=0)


def test_anchored_is_mean_of_clip_with_the_anchor():
    emb, scale = _embeddings(["text", "image", "audio"]), _scale()
    out = build_objective({"name": "anchored", "anchor": "image"})(emb, scale)
    pair_losses = [ClipLoss()(emb["image"], emb[m], scale) for m in ("text", "audio")]
    torch.testing.assert_close(out.loss, sum(pair_losses) / 2, rtol=1e-12, atol=0)
    assert set(out.metrics) == {"loss", "logit_scale", "loss/image-text", "loss/image-audio"}


def test_symile_weights_are_keyed_by_anchor_modality():
    emb, scale = _embeddings(["x", "y", "z"]), _scale()
    weighted = build_objective({"name": "symile", "negatives": "n2", "weights": {"x": 2.0}})
    out = weighted(emb, scale)
    terms = [out.metrics[f"loss/{m}"] for m in "xyz"]
    assert out.loss.item() == pytest.approx((2 * terms[0] + terms[1] + terms[2]) / 4, rel=1e-12)
    plain = build_objective({"name": "symile", "negatives": "n2"})(emb, scale)
    assert plain.loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)


def _symile_reference(emb, scale, negatives):
    return Symile(negatives)(list(emb.values()), scale)


@pytest.mark.parametrize("count", [3, 4])
def test_symile_n2_equals_symile_package(count):
    names = ["m0", "m1", "m2", "m3"][:count]
    emb, scale = _embeddings(names, rows=5, dim=4), _scale(3.0)
    ours = build_objective({"name": "symile", "negatives": "n2", "block_size": 7})(emb, scale)
    reference = _symile_reference(emb, scale, "n_squared")
    inputs = [*emb.values(), scale]
    torch.testing.assert_close(ours.loss, reference, rtol=1e-12, atol=0)
    _assert_close_all(_grads(ours.loss, inputs), _grads(reference, inputs))


def test_symile_n_equals_symile_package_with_the_same_permutations(monkeypatch):
    emb, scale = _embeddings(["x", "y", "z"], rows=7), _scale(4.0)
    torch.manual_seed(123)
    reference = _symile_reference(emb, scale, "n")
    torch.manual_seed(123)
    ours = build_objective({"name": "symile", "negatives": "n"})(emb, scale)
    inputs = [*emb.values(), scale]
    torch.testing.assert_close(ours.loss, reference, rtol=1e-12, atol=0)
    _assert_close_all(_grads(ours.loss, inputs), _grads(reference, inputs))

    # with an explicit generator: the reference draws from an identically seeded one
    original = torch.randperm
    reference_generator = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch, "randperm", lambda n: original(n, generator=reference_generator))
    reference = _symile_reference(emb, scale, "n")
    monkeypatch.setattr(torch, "randperm", original)
    objective = build_objective({"name": "symile", "negatives": "n"})
    ours = objective(emb, scale, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.loss, reference, rtol=1e-12, atol=0)


def test_symile_n2_with_two_modalities_is_clip():
    emb, scale = _embeddings(["image", "text"]), _scale()
    ours = build_objective({"name": "symile", "negatives": "n2"})(emb, scale).loss
    reference = ClipLoss()(emb["image"], emb["text"], scale)
    inputs = [*emb.values(), scale]
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    _assert_close_all(_grads(ours, inputs), _grads(reference, inputs))


# ---------------------------------------------------------------- missing modalities


def _present(rows, absent):
    """``absent`` lists (row, column) pairs."""
    present = torch.ones(rows, 3, dtype=torch.bool)
    for row, column in absent:
        present[row, column] = False
    return present


def test_clip_with_missing_equals_open_clip_on_each_pairs_sub_batch():
    emb, scale = _embeddings(["a", "b", "c"], rows=7), _scale()
    present = _present(7, [(0, 0), (1, 1), (2, 2), (3, 0), (3, 2)])
    out = build_objective({"name": "clip"})(emb, scale, present=present)
    expected = []
    for (first, second), (i, j) in zip(
        [("a", "b"), ("a", "c"), ("b", "c")], [(0, 1), (0, 2), (1, 2)]
    ):
        rows = present[:, i] & present[:, j]
        expected.append(ClipLoss()(emb[first][rows], emb[second][rows], scale))
    torch.testing.assert_close(out.loss, sum(expected) / 3, rtol=1e-12, atol=0)
    assert out.metrics["loss/a-c"] == pytest.approx(expected[1].item())
    grads = _grads(out.loss, list(emb.values()))
    for column, grad in enumerate(grads):
        absent = ~present[:, column]
        assert torch.all(grad[absent] == 0)
        has_partner = ~absent & (present.sum(dim=1) >= 2)  # row 3 has only b: no term uses it
        assert torch.all(grad[has_partner].abs().sum(dim=1) > 0)
        assert torch.all(grad[~has_partner] == 0)


def test_sigmoid_with_missing_equals_open_clip_on_sub_batch():
    emb, scale = _embeddings(["image", "text"], rows=6), _scale(10.0)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    present = torch.ones(6, 2, dtype=torch.bool)
    present[1, 0] = present[4, 1] = False
    out = build_objective({"name": "sigmoid"})(emb, scale, bias, present=present)
    rows = present.all(dim=1)
    reference = SigLipLoss()(emb["image"][rows], emb["text"][rows], scale, bias)
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=0)
    grad_image, grad_text = _grads(out.loss, [emb["image"], emb["text"]])
    assert torch.all(grad_image[1] == 0) and torch.all(grad_text[4] == 0)


def test_a_term_without_valid_rows_adds_zero_and_no_nan():
    emb, scale = _embeddings(["a", "b", "c"], rows=4), _scale()
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:, 2] = False  # no sample has c: terms a-c and b-c are empty
    for name in ("clip", "sigmoid"):
        out = build_objective({"name": name})(emb, scale, torch.tensor(-1.0), present=present)
        only_ab = build_objective({"name": name, "pairs": [["a", "b"]]})
        expected = only_ab({"a": emb["a"], "b": emb["b"]}, scale, torch.tensor(-1.0)).loss
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
        assert out.metrics["loss/a-c"] == 0.0 and out.metrics["loss/b-c"] == 0.0
        assert torch.all(_grads(out.loss, [emb["c"]])[0] == 0)
    nothing = torch.zeros(4, 3, dtype=torch.bool)
    for config in ({"name": "clip"}, {"name": "symile", "negatives": "n2"}, {"name": "symile"}):
        out = build_objective(config)(emb, scale, present=nothing)
        assert out.loss.item() == 0.0
        grads = _grads(out.loss, list(emb.values()))
        assert all(torch.all(grad == 0) for grad in grads)


def _naive_symile_n2_rows(subs, scale, anchor):
    """Per-row loss of one anchor by the B^M formula, with ones for absent embeddings."""
    letters = "ijkl"[: len(subs)]
    tensor = scale * torch.einsum(",".join(f"{c}d" for c in letters) + "->" + letters, *subs)
    other_axes = tuple(axis for axis in range(len(subs)) if axis != anchor)
    lse = tensor.logsumexp(dim=other_axes)
    positive = scale * torch.stack(subs).prod(dim=0).sum(dim=-1)
    return lse - positive


def _with_ones(emb, present):
    return [torch.where(present[:, j, None], value, 1.0) for j, value in enumerate(emb.values())]


def test_symile_n2_with_missing_equals_formula_by_hand():
    emb, scale = _embeddings(["x", "y", "z"], rows=6), _scale(5.0)
    present = _present(6, [(0, 0), (1, 1), (2, 2), (3, 1), (3, 2), (4, 0), (4, 1)])
    out = build_objective({"name": "symile", "negatives": "n2", "block_size": 5})(
        emb, scale, present=present
    )
    subs = _with_ones(emb, present)
    valid = present & (present.sum(dim=1, keepdim=True) >= 2)  # rows 3 and 4 have one modality
    terms = [_naive_symile_n2_rows(subs, scale, a)[valid[:, a]].mean() for a in range(3)]
    torch.testing.assert_close(out.loss, sum(terms) / 3, rtol=1e-12, atol=0)
    grads = _grads(out.loss, list(emb.values()))
    for column, grad in enumerate(grads):
        assert torch.all(grad[~present[:, column]] == 0)


def test_symile_n2_without_a_modality_is_two_modality_symile_plus_log_b():
    """Absent z is the ones vector: anchor x sees each y_j B times (+ log B); z is skipped."""
    emb, scale = _embeddings(["x", "y", "z"], rows=5), _scale(5.0)
    present = torch.ones(5, 3, dtype=torch.bool)
    present[:, 2] = False
    out = build_objective({"name": "symile", "negatives": "n2"})(emb, scale, present=present)
    clip = ClipLoss()(emb["x"], emb["y"], scale)
    torch.testing.assert_close(out.loss, clip + math.log(5), rtol=1e-12, atol=0)
    assert out.metrics["loss/z"] == 0.0


def test_symile_n_with_missing_equals_formula_by_hand():
    emb, scale = _embeddings(["x", "y", "z"], rows=6), _scale(5.0)
    present = _present(6, [(0, 0), (1, 1), (2, 2), (5, 0), (5, 1)])
    objective = build_objective({"name": "symile", "negatives": "n"})
    out = objective(emb, scale, present=present, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    perms = [torch.randperm(6, generator=generator) for _ in range(6)]
    subs = _with_ones(emb, present)
    valid = present & (present.sum(dim=1, keepdim=True) >= 2)
    terms = []
    for a in range(3):
        others = [m for m in range(3) if m != a]
        shuffled = subs[others[0]][perms[2 * a]] * subs[others[1]][perms[2 * a + 1]]
        logits = scale * subs[a] @ shuffled.T
        positive = scale * (subs[0] * subs[1] * subs[2]).sum(dim=-1)
        logits = torch.where(torch.eye(6, dtype=torch.bool), positive[:, None], logits)
        rows = F.cross_entropy(logits, torch.arange(6), reduction="none")
        terms.append(rows[valid[:, a]].mean())
    torch.testing.assert_close(out.loss, sum(terms) / 3, rtol=1e-12, atol=0)
    grads = _grads(out.loss, list(emb.values()))
    for column, grad in enumerate(grads):
        assert torch.all(grad[~present[:, column]] == 0)


# ---------------------------------------------------------------- errors


def test_errors_name_the_field_and_the_fix():
    emb, scale = _embeddings(["a", "b"]), _scale()
    with pytest.raises(ValueError, match=r"model\.objective\.weights: keys \['a-c'\]"):
        build_objective({"name": "clip", "weights": {"a-c": 1.0}})(emb, scale)
    with pytest.raises(ValueError, match=r"model\.objective\.weights: \['a-b'\] are negative"):
        build_objective({"name": "clip", "weights": {"a-b": -1.0}})(emb, scale)
    with pytest.raises(ValueError, match=r"model\.objective\.pairs"):
        build_objective({"name": "clip", "pairs": [["a", "c"]]})(emb, scale)
    with pytest.raises(ValueError, match=r"model\.objective\.anchor: Field required"):
        build_objective({"name": "anchored"})
    with pytest.raises(ValueError, match=r"model\.objective\.anchor: 'c' is not one of"):
        build_objective({"name": "anchored", "anchor": "c"})(emb, scale)
    with pytest.raises(ValueError, match="needs a logit_bias"):
        build_objective({"name": "sigmoid"})(emb, scale)
    with pytest.raises(ValueError, match=r"present has shape \(6, 3\)"):
        build_objective({"name": "clip"})(emb, scale, present=torch.ones(6, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"model\.objective\.name: unknown objective 'nope'"):
        build_objective({"name": "nope"})
