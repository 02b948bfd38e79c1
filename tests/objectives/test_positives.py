"""Same-group positives (``model.objective.positives``): every mode of clip, anchored, sigmoid and
symile ``n`` equals a naive float64 reference written here with loops, and symile ``n2`` one
built on the dense ``B^M`` logit tensor, in value and gradient, with presence masks and groups
of sizes 1..5; pytorch-metric-learning's SupConLoss for ``multi``."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import SupConLoss

from mmalign.errors import ConfigError
from mmalign.objectives import build_objective
from mmalign.objectives.symile_n import draw_permutations

MODES = ["instance", "multi", "exclude", "debiased"]
TAU_PLUS = 0.3


def _groups(seed=0):
    """15 rows in groups of sizes 1, 2, 3, 4 and 5, shuffled; ids are arbitrary int64."""
    ids = torch.tensor([10**12 + size for size in range(1, 6) for _ in range(size)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


def _embeddings(names, rows=15, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)
        .detach()
        .requires_grad_()
        for name in names
    }


def _present(rows, modalities, holes):
    present = torch.ones(rows, modalities, dtype=torch.bool)
    for row, column in holes:
        present[row, column] = False
    return present


HOLES = [(0, 0), (3, 1), (4, 2), (7, 0), (7, 2), (11, 1), (14, 0)]


def _softmax_row_loss(logits, own, positives, mode, scale):
    """One query's loss; ``logits`` maps candidate index -> logit (valid candidates only)."""
    denominator = sum(torch.exp(value) for value in logits.values())
    if mode == "instance":
        return -torch.log(torch.exp(logits[own]) / denominator)
    if mode == "multi":
        terms = [torch.log(torch.exp(logits[p]) / denominator) for p in positives]
        return -sum(terms) / len(positives)
    if mode == "exclude":
        kept = sum(torch.exp(value) for k, value in logits.items() if k not in positives)
        return -torch.log(torch.exp(logits[own]) / (torch.exp(logits[own]) + kept))
    others = [torch.exp(value) for k, value in logits.items() if k != own]
    count = len(logits)
    if not others:
        return logits[own] * 0.0
    mean = sum(others) / len(others)
    estimate = (mean - TAU_PLUS * torch.exp(logits[own])) / (1 - TAU_PLUS)
    estimate = torch.maximum(estimate, torch.exp(-scale))
    return -torch.log(torch.exp(logits[own]) / (torch.exp(logits[own]) + (count - 1) * estimate))


def _reference_clip(emb, scale, present, groups, pairs, mode, names):
    terms = []
    for first, second in pairs:
        a, b = names.index(first), names.index(second)
        valid = [i for i in range(len(groups)) if present[i, a] and present[i, b]]
        if not valid:
            continue
        total = 0.0
        for i in valid:
            positives = [k for k in valid if groups[k] == groups[i]]
            for query, key in ((first, second), (second, first)):
                logits = {k: scale * emb[query][i] @ emb[key][k] for k in valid}
                total = total + _softmax_row_loss(logits, i, positives, mode, scale) / 2
        terms.append(total / len(valid))
    return sum(terms) / len(terms)


def _reference_sigmoid(emb, scale, bias, present, groups, mode, names):
    a, b = 0, 1
    valid = [i for i in range(len(groups)) if present[i, a] and present[i, b]]
    total = 0.0
    for i in valid:
        for k in valid:
            same = bool(groups[k] == groups[i])
            if mode == "exclude" and same and k != i:
                continue
            label = 1.0 if (k == i or (mode == "multi" and same)) else -1.0
            logit = scale * emb[names[a]][i] @ emb[names[b]][k] + bias
            total = total - torch.log(torch.sigmoid(label * logit))
    return total / len(valid)


def _reference_symile_n(emb, scale, present, groups, mode, names, perms):
    """Symile with shuffled negatives, one row and one column at a time."""
    rows, count = len(groups), len(names)
    filled = [
        [emb[m][i] if present[i, j] else torch.ones_like(emb[m][i]) for i in range(rows)]
        for j, m in enumerate(names)
    ]
    terms = []
    for a in range(count):
        others = [m for m in range(count) if m != a]
        valid = [i for i in range(rows) if present[i, a] and int(present[i].sum()) >= 2]
        if not valid:
            continue
        total = 0.0
        for i in valid:
            logits, positives = {}, []
            for column in range(rows):
                tuple_rows = (
                    [i] * len(others)
                    if column == i
                    else [int(perms[a][o][column]) for o in range(len(others))]
                )
                product = filled[a][i].clone()
                for other, row in zip(others, tuple_rows):
                    product = product * filled[other][row]
                logits[column] = scale * product.sum()
                if all(groups[row] == groups[i] for row in tuple_rows):
                    positives.append(column)
            total = total + _softmax_row_loss(logits, i, positives, mode, scale)
        terms.append(total / len(valid))
    return sum(terms) / len(terms)


def _reference_symile_n2(emb, scale, present, groups, mode, names):
    """Dense: the full ``B^M`` logit tensor, each anchor's axis moved first; a candidate tuple
    is a positive of row ``i`` when all its rows are in ``i``'s group."""
    count, rows = len(names), len(groups)
    filled = [torch.where(present[:, j, None], emb[m], 1.0) for j, m in enumerate(names)]
    letters = "ijkl"[:count]
    full = scale * torch.einsum(",".join(f"{x}d" for x in letters) + "->" + letters, *filled)
    same = groups[:, None] == groups[None, :]
    positive = same
    for _ in range(count - 2):
        positive = (positive[:, :, None] & same[:, None, :]).reshape(rows, -1)
    diagonal = torch.arange(rows) * sum(rows**k for k in range(count - 1))  # (i, i, ..., i)
    own_column = torch.zeros_like(positive)
    own_column[torch.arange(rows), diagonal] = True
    terms = []
    for a in range(count):
        logits = full.movedim(a, 0).reshape(rows, -1)
        own = logits[torch.arange(rows), diagonal]
        if mode == "instance":
            row_loss = logits.logsumexp(dim=1) - own
        elif mode == "multi":
            mean_positive = (logits * positive).sum(dim=1) / positive.sum(dim=1)
            row_loss = logits.logsumexp(dim=1) - mean_positive
        elif mode == "exclude":
            kept = torch.exp(logits).masked_fill(positive & ~own_column, 0.0).sum(dim=1)
            row_loss = -torch.log(torch.exp(own) / kept)
        else:
            others = logits.shape[1] - 1
            mean = torch.exp(logits).masked_fill(own_column, 0.0).sum(dim=1) / others
            estimate = (mean - TAU_PLUS * torch.exp(own)) / (1 - TAU_PLUS)
            estimate = torch.maximum(estimate, torch.exp(-scale))
            row_loss = -torch.log(torch.exp(own) / (torch.exp(own) + others * estimate))
        valid = present[:, a] & (present.sum(dim=1) >= 2)
        terms.append(row_loss[valid].mean())
    return sum(terms) / len(terms)


def assert_loss_and_gradients_close(loss, reference, tensors):
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(
        torch.autograd.grad(loss, tensors, retain_graph=True),
        torch.autograd.grad(reference, tensors),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["clip", "anchored"])
def test_pairwise_softmax_modes_equal_the_naive_reference(mode, name):
    names = ["a", "b", "c"]
    emb, groups = _embeddings(names), _groups()
    present = _present(15, 3, HOLES)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    config = {"name": name, "positives": mode, "tau_plus": TAU_PLUS}
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    if name == "anchored":
        config["anchor"], pairs = "b", [("b", "a"), ("b", "c")]
    loss = build_objective(config)(emb, scale, present=present, groups=groups).loss
    reference = _reference_clip(emb, scale, present, groups, pairs, mode, names)
    assert_loss_and_gradients_close(loss, reference, [*emb.values(), scale])


@pytest.mark.parametrize("mode", ["instance", "multi", "exclude"])
def test_sigmoid_modes_equal_the_naive_reference(mode):
    names = ["a", "b"]
    emb, groups = _embeddings(names), _groups(seed=1)
    present = _present(15, 2, [(0, 0), (3, 1), (9, 0)])
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    objective = build_objective({"name": "sigmoid", "positives": mode})
    loss = objective(emb, scale, bias, present=present, groups=groups).loss
    reference = _reference_sigmoid(emb, scale, bias, present, groups, mode, names)
    assert_loss_and_gradients_close(loss, reference, [*emb.values(), scale, bias])


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_symile_n_modes_equal_the_naive_reference(mode, count):
    names = ["a", "b", "c", "d"][:count]
    rows = 15
    emb = _embeddings(names, rows=rows, dim=5, seed=count)
    # small groups make all-in-group shuffled tuples likely enough to matter: sizes 1..5
    groups = _groups(seed=count)
    present = _present(rows, count, HOLES if count == 3 else [*HOLES, (5, 3), (6, 3)])
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    objective = build_objective(
        {"name": "symile", "negatives": "n", "positives": mode, "tau_plus": TAU_PLUS}
    )
    generator = torch.Generator().manual_seed(5)
    loss = objective(emb, scale, present=present, groups=groups, generator=generator).loss
    perms = draw_permutations(count, rows, torch.Generator().manual_seed(5), torch.device("cpu"))
    reference = _reference_symile_n(emb, scale, present, groups, mode, names, perms)
    assert_loss_and_gradients_close(loss, reference, [*emb.values(), scale])


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_symile_n2_modes_equal_the_dense_reference(mode, count):
    """Blocks of one prefix (15 candidates) and one block of all 15^(M-1) agree with the
    reference: masking works across block boundaries and within one block."""
    names = ["a", "b", "c", "d"][:count]
    rows = 15
    emb = _embeddings(names, rows=rows, dim=5, seed=count)
    groups = _groups(seed=count)  # sizes 1..5
    present = _present(rows, count, HOLES if count == 3 else [*HOLES, (5, 3), (6, 3)])
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    for block_size in (7, rows**count):
        config = {"name": "symile", "negatives": "n2", "block_size": block_size}
        objective = build_objective({**config, "positives": mode, "tau_plus": TAU_PLUS})
        loss = objective(emb, scale, present=present, groups=groups).loss
        reference = _reference_symile_n2(emb, scale, present, groups, mode, names)
        assert_loss_and_gradients_close(loss, reference, [*emb.values(), scale])


def test_symile_reference_sees_shuffled_positive_tuples():
    """The groups above do put shuffled all-in-group tuples among the candidates, so the
    symile test exercises more than the own column."""
    groups, rows = _groups(seed=3), 15
    perms = draw_permutations(3, rows, torch.Generator().manual_seed(5), torch.device("cpu"))
    same = groups[:, None] == groups[None, :]
    extra = (same[:, perms[0][0]] & same[:, perms[0][1]]).fill_diagonal_(False)
    assert int(extra.sum()) > 0


@pytest.mark.parametrize(
    "config",
    [
        {"name": "clip"},
        {"name": "anchored", "anchor": "a"},
        {"name": "sigmoid"},
        {"name": "symile", "negatives": "n"},
        {"name": "symile", "negatives": "n2"},
    ],
)
def test_all_distinct_groups_multi_and_exclude_equal_instance(config):
    """For symile ``n`` the seed is one whose shuffles rebuild no row's own tuple (a rebuilt
    tuple is a positive under multi/exclude but a negative under instance, as documented)."""
    seed = 4
    perms = draw_permutations(3, 8, torch.Generator().manual_seed(seed), torch.device("cpu"))
    rows = torch.arange(8)
    assert all(not ((p[0] == p[1]) & (p[0] != rows)).any() for p in perms)
    names = ["a", "b", "c"]
    emb = _embeddings(names, rows=8)
    present = _present(8, 3, [(0, 0), (3, 1), (4, 2)])
    scale = torch.tensor(6.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64) if config["name"] == "sigmoid" else None
    groups = torch.arange(8) * 7 + 3

    def loss(mode, with_groups=True):
        objective = build_objective({**config, "positives": mode})
        return objective(
            emb,
            scale,
            bias,
            present=present,
            generator=torch.Generator().manual_seed(seed),
            groups=groups if with_groups else None,
        ).loss

    instance = loss("instance", with_groups=False)
    assert torch.equal(loss("instance"), instance)  # groups never change instance
    for mode in ["multi", "exclude"]:
        torch.testing.assert_close(loss(mode), instance, rtol=1e-13, atol=0)
        torch.testing.assert_close(loss(mode, with_groups=False), instance, rtol=1e-13, atol=0)


def test_clip_multi_equals_pytorch_metric_learning_supcon():
    """Each direction of ``multi`` is SupCon with the other modality as reference set."""
    emb, groups = _embeddings(["image", "text"], rows=12), _groups()[:12]
    scale = 1 / 0.07
    ours = build_objective({"name": "clip", "positives": "multi"})(
        emb, torch.tensor(scale, dtype=torch.float64), groups=groups
    ).loss
    supcon = SupConLoss(temperature=0.07, distance=DotProductSimilarity(normalize_embeddings=False))
    image_to_text = supcon(emb["image"], groups, ref_emb=emb["text"], ref_labels=groups.clone())
    text_to_image = supcon(emb["text"], groups, ref_emb=emb["image"], ref_labels=groups.clone())
    reference = (image_to_text + text_to_image) / 2
    assert_loss_and_gradients_close(ours, reference, list(emb.values()))


def test_debiased_with_tau_plus_zero_is_instance_and_is_finite_at_large_scale():
    emb = _embeddings(["a", "b"], rows=10)
    scale = torch.tensor(4.0, dtype=torch.float64)
    debiased = build_objective({"name": "clip", "positives": "debiased", "tau_plus": 0.0})
    torch.testing.assert_close(
        debiased(emb, scale).loss, build_objective({"name": "clip"})(emb, scale).loss
    )
    big = {name: value.detach().float().requires_grad_() for name, value in emb.items()}
    high = build_objective({"name": "clip", "positives": "debiased", "tau_plus": 0.9})
    out = high(big, torch.tensor(100.0))
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    assert all(torch.isfinite(value.grad).all() for value in big.values())


@pytest.mark.parametrize("mode", MODES)
def test_a_term_without_valid_rows_is_zero_not_nan(mode):
    emb = _embeddings(["a", "b", "c"], rows=4)
    present = torch.tensor([[True, False, True]] * 4)  # b is never present
    objective = build_objective({"name": "clip", "positives": mode, "pairs": [["a", "b"]]})
    out = objective(emb, torch.tensor(5.0), present=present, groups=torch.tensor([1, 1, 2, 2]))
    assert out.loss.item() == 0.0 and out.metrics["loss/a-b"] == 0.0
    grads = torch.autograd.grad(out.loss, list(emb.values()))
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_unsupported_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="positives"):
        build_objective({"name": "sigmoid", "positives": "debiased"})
    with pytest.raises(ConfigError, match="tau_plus"):
        build_objective({"name": "clip", "positives": "debiased", "tau_plus": 1.0})
    with pytest.raises(ValueError, match="groups"):
        build_objective({"name": "clip"})(
            _embeddings(["a", "b"], rows=3), torch.tensor(1.0), groups=torch.zeros(2)
        )


@pytest.mark.parametrize("mode", ["exclude", "debiased"])
def test_symile_n2_terms_without_valid_rows_or_negatives_are_zero_not_nan(mode):
    """A modality never present gives a zero term; with every row in one group ``exclude``
    masks every candidate but the own tuple (all losses 0); with one row ``debiased`` has no
    other candidate (loss 0). Gradients stay finite (zero where the loss is constant)."""
    emb = _embeddings(["a", "b", "c"], rows=4)
    scale = torch.tensor(5.0, dtype=torch.float64)
    objective = build_objective(
        {"name": "symile", "negatives": "n2", "positives": mode, "block_size": 3}
    )
    present = torch.tensor([[True, False, True]] * 4)  # b is never present
    out = objective(emb, scale, present=present, groups=torch.tensor([1, 1, 2, 2]))
    assert out.metrics["loss/b"] == 0.0 and out.loss.item() > 0.0
    grads = torch.autograd.grad(out.loss, list(emb.values()))
    assert all(torch.isfinite(grad).all() for grad in grads)
    if mode == "exclude":
        everything = objective(emb, scale, groups=torch.zeros(4, dtype=torch.long))
    else:
        everything = objective({m: e[:1] for m, e in emb.items()}, scale)
    assert everything.loss.item() == 0.0
    grads = torch.autograd.grad(everything.loss, list(emb.values()))
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)
