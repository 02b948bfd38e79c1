"""model.objective.terms: two_view, distill and queue equal naive float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import ConfigError, load_config
from mmalign.config.terms import term_config
from mmalign.objectives import build_objective
from mmalign.objectives.terms import TermsObjective

ROWS, DIM = 7, 5


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


def _objective(terms: list[dict], name: str = "clip") -> TermsObjective:
    configs = [term_config(term) for term in terms]
    return TermsObjective(build_objective({"name": name}), configs, ["a", "b"], DIM)


def _present(*columns: list[bool]) -> torch.Tensor:
    return torch.tensor(list(zip(*columns)), dtype=torch.bool)


def _naive_nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> float:
    views = torch.cat([first, second])
    count = first.shape[0]
    total = 0.0
    for i in range(2 * count):
        positive = (i + count) % (2 * count)
        others = [j for j in range(2 * count) if j != i]
        similarities = torch.stack([views[i] @ views[j] / temperature for j in others])
        total += float(torch.logsumexp(similarities, 0) - views[i] @ views[positive] / temperature)
    return total / (2 * count)


def test_two_view_equals_naive_nt_xent_with_missing_rows() -> None:
    a, b, view = _unit(ROWS, DIM, 0), _unit(ROWS, DIM, 1), _unit(ROWS, DIM, 2)
    has_a = [True, True, False, True, True, False, True]
    present = _present(has_a, [True] * ROWS, has_a)
    objective = _objective([{"type": "two_view", "modality": "a", "temperature": 0.3}])
    embeddings = {"a": a, "b": b, "a@view2": view}
    out = objective(embeddings, torch.tensor(10.0), present=present)
    keep = torch.tensor(has_a)
    expected = _naive_nt_xent(a[keep], view[keep], 0.3)
    assert out.metrics["loss/two_view_a"] == pytest.approx(expected, rel=1e-9)


def _naive_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    rows = []
    for s_row, t_row in zip(student, teacher):
        p_t, p_s = torch.softmax(t_row, 0), torch.softmax(s_row, 0)
        rows.append(float((p_t * (p_t.log() - p_s.log())).sum()))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_distill_equals_naive_kl_with_a_wider_teacher(temperature: float | None) -> None:
    a, b = _unit(ROWS, DIM, 0), _unit(ROWS, DIM, 1)
    ta, tb = _unit(ROWS, 12, 3), _unit(ROWS, 12, 4)  # the teacher's dim differs
    has_b = [True, False, True, True, True, True, False]
    present = _present([True] * ROWS, has_b, [True] * ROWS, has_b)
    objective = _objective([{"type": "distill", "teacher": "unused", "temperature": temperature}])
    objective.teacher_logit_scale = 20.0
    student_scale = 10.0 if temperature is None else 1 / temperature
    teacher_scale = 20.0 if temperature is None else 1 / temperature
    embeddings = {"a": a, "b": b, "a@teacher": ta, "b@teacher": tb}
    out = objective(embeddings, torch.tensor(10.0, dtype=torch.float64), present=present)
    keep = torch.tensor(has_b)
    a, b, ta, tb = a[keep], b[keep], ta[keep], tb[keep]
    expected = 0.5 * (
        _naive_kl(student_scale * a @ b.T, teacher_scale * ta @ tb.T)
        + _naive_kl(student_scale * b @ a.T, teacher_scale * tb @ ta.T)
    )
    assert out.metrics["loss/distill"] == pytest.approx(expected, rel=1e-9)


def _naive_queue_infonce(a: torch.Tensor, b: torch.Tensor, qa, qb, scale: float) -> float:
    total = 0.0
    for queries, keys, queued in ((a, b, qb), (b, a, qa)):
        candidates = torch.cat([keys, queued])
        for i, query in enumerate(queries):
            logits = torch.stack([scale * query @ key for key in candidates])
            total += float(torch.logsumexp(logits, 0) - logits[i])
    return total / (2 * a.shape[0])


def test_queue_equals_dense_loss_over_batch_and_queue() -> None:
    objective = _objective([{"type": "queue", "size": 10, "weight": 0.5}])
    assert objective.queue is not None
    objective.queue.double()
    first = {"a": _unit(ROWS, DIM, 0), "b": _unit(ROWS, DIM, 1)}
    out = objective(first, torch.tensor(10.0))
    # an empty queue: the term is the main clip loss
    assert out.metrics["loss/queue"] == pytest.approx(out.metrics["loss/main"], rel=1e-9)
    objective.end_step()
    second = {"a": _unit(ROWS, DIM, 5), "b": _unit(ROWS, DIM, 6)}
    has_a = [True, False, True, True, True, True, True]
    present = _present(has_a, [True] * ROWS)
    objective(second, torch.tensor(10.0), present=present)
    objective.end_step()  # the queue now holds 7 + 6 rows of b, 10 kept; 6 + 6 of a, 10 kept
    assert objective.queue.stored("a").shape[0] == objective.queue.stored("b").shape[0] == 10
    keep = torch.tensor(has_a)
    assert torch.equal(objective.queue.stored("a")[-6:], second["a"][keep])
    third = {"a": _unit(ROWS, DIM, 7), "b": _unit(ROWS, DIM, 8)}
    out = objective(third, torch.tensor(10.0, dtype=torch.float64))
    qa, qb = objective.queue.stored("a"), objective.queue.stored("b")
    expected = _naive_queue_infonce(third["a"], third["b"], qa, qb, 10.0)
    assert out.metrics["loss/queue"] == pytest.approx(expected, rel=1e-9)
    assert out.metrics["loss"] == pytest.approx(out.metrics["loss/main"] + 0.5 * expected)
    assert float(out.loss) == pytest.approx(out.metrics["loss"])


def _naive_queue_exclude(a, b, groups, qa, qb, queued_groups, scale: float) -> float:
    """Each row's own column is its positive; same-group columns of the batch and the queue
    (other than its own) leave the denominator."""
    total = 0.0
    for queries, keys, queued in ((a, b, qb), (b, a, qa)):
        candidates = torch.cat([keys, queued])
        candidate_groups = torch.cat([groups, queued_groups])
        for i, query in enumerate(queries):
            kept = [
                j for j in range(candidates.shape[0]) if j == i or candidate_groups[j] != groups[i]
            ]
            logits = torch.stack([scale * query @ candidates[j] for j in kept])
            total += float(torch.logsumexp(logits, 0) - scale * query @ keys[i])
    return total / (2 * a.shape[0])


def test_queue_excludes_queued_entries_of_the_rows_group() -> None:
    """positives: exclude: an earlier copy of a row's caption (same group) in the queue is not
    one of its negatives (before, the queue kept it as a negative whatever the mode)."""
    configs = [term_config({"type": "queue", "size": 9})]
    inner = build_objective({"name": "clip", "positives": "exclude"})
    objective = TermsObjective(inner, configs, ["a", "b"], DIM)
    assert objective.queue is not None
    objective.queue.double()
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 5])
    earlier = {"a": _unit(ROWS, DIM, 1), "b": _unit(ROWS, DIM, 2)}
    objective(earlier, torch.tensor(10.0), groups=groups + 10)
    objective.end_step()
    objective(earlier, torch.tensor(10.0), groups=groups)  # the same records again
    objective.end_step()
    qa, qb = objective.queue.stored("a"), objective.queue.stored("b")
    queued_groups = objective.queue.stored_groups("b")
    assert queued_groups.tolist() == [14, 15, *groups.tolist()]
    now = {"a": _unit(ROWS, DIM, 3), "b": earlier["b"]}
    out = objective(now, torch.tensor(10.0, dtype=torch.float64), groups=groups)
    expected = _naive_queue_exclude(now["a"], now["b"], groups, qa, qb, queued_groups, 10.0)
    assert out.metrics["loss/queue"] == pytest.approx(expected, rel=1e-9)
    # under instance the same queue counts every queued copy as a negative: a larger loss
    plain = _naive_queue_infonce(now["a"], now["b"], qa, qb, 10.0)
    assert plain > expected + 0.1


def test_terms_are_weighted_and_the_loss_falls_with_gradient() -> None:
    objective = _objective(
        [{"type": "two_view", "modality": "b", "weight": 2.0}, {"type": "queue", "size": 4}]
    )
    embeddings = {
        name: _unit(ROWS, DIM, seed).requires_grad_() for seed, name in enumerate(("a", "b"))
    }
    view = _unit(ROWS, DIM, 9)
    out = objective({**embeddings, "b@view2": view}, torch.tensor(10.0))
    parts = out.metrics
    assert parts["loss"] == pytest.approx(
        parts["loss/main"] + 2.0 * parts["loss/two_view_b"] + parts["loss/queue"]
    )
    out.loss.backward()
    assert embeddings["b"].grad is not None and embeddings["b"].grad.abs().sum() > 0


def _config(terms: list[dict], objective: str = "clip") -> dict:
    towers = {name: {"type": "tabular", "in_features": 3} for name in ("a", "b", "c")}
    return {
        "model": {"towers": towers, "objective": {"name": objective, "terms": terms}},
        "data": {"train": "x", "fields": {"a": "a", "b": "b", "c": "c"}},
    }


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.objective.*terms.*no tower named 'z'"):
        load_config(_config([{"type": "two_view", "modality": "z"}]))
    with pytest.raises(ConfigError, match=r"terms\.0\.queue\.sizes"):
        load_config(_config([{"type": "queue", "sizes": 4}]))
    with pytest.raises(ConfigError, match="two_view_a is given twice"):
        load_config(_config([{"type": "two_view", "modality": "a"}] * 2))
    with pytest.raises(ConfigError, match="queue needs a pairwise objective"):
        symile = build_objective({"name": "symile"})
        TermsObjective(symile, [term_config({"type": "queue", "size": 4})], ["a", "b", "c"], 4)


def test_two_view_and_distill_with_symile_equal_naive_references() -> None:
    """Under symile the main loss is symile's own, two_view is NT-Xent and distill is the mean
    over every pair of the naive KL (a row missing c leaves the pairs with c)."""
    names = ["a", "b", "c"]
    terms = [
        {"type": "two_view", "modality": "a", "weight": 0.5, "temperature": 0.3},
        {"type": "distill", "teacher": "unused", "temperature": 0.5, "weight": 2.0},
    ]
    configs = [term_config(term) for term in terms]
    objective = TermsObjective(build_objective({"name": "symile"}), configs, names, DIM)
    student = {m: _unit(ROWS, DIM, seed) for seed, m in enumerate(names)}
    teacher = {f"{m}@teacher": _unit(ROWS, 12, 10 + seed) for seed, m in enumerate(names)}
    view = _unit(ROWS, DIM, 20)
    has_c = [True, True, True, False, True, True, True]
    full = [True] * ROWS
    present = _present(full, full, has_c, full, full, full, has_c)
    scale = torch.tensor(10.0, dtype=torch.float64)
    embeddings = {**student, "a@view2": view, **teacher}
    out = objective(embeddings, scale, present=present, generator=torch.Generator().manual_seed(0))
    symile = build_objective({"name": "symile"})
    main = symile(
        student, scale, present=present[:, :3], generator=torch.Generator().manual_seed(0)
    )
    assert out.metrics["loss/main"] == pytest.approx(main.metrics["loss"], rel=1e-12)
    two_view = _naive_nt_xent(student["a"], view, 0.3)
    assert out.metrics["loss/two_view_a"] == pytest.approx(two_view, rel=1e-9)
    pairs = []
    for first, second in (("a", "b"), ("a", "c"), ("b", "c")):
        keep = torch.tensor(has_c) if "c" in (first, second) else torch.ones(ROWS, dtype=bool)
        s1, s2 = student[first][keep], student[second][keep]
        t1, t2 = teacher[f"{first}@teacher"][keep], teacher[f"{second}@teacher"][keep]
        pairs.append(
            0.5
            * (_naive_kl(2 * s1 @ s2.T, 2 * t1 @ t2.T) + _naive_kl(2 * s2 @ s1.T, 2 * t2 @ t1.T))
        )
    distill = sum(pairs) / 3
    assert out.metrics["loss/distill"] == pytest.approx(distill, rel=1e-9)
    expected = main.metrics["loss"] + 0.5 * two_view + 2.0 * distill
    assert float(out.loss) == pytest.approx(expected, rel=1e-9)
