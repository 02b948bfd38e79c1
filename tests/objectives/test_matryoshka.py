"""Matryoshka loss: the weighted sum of the objective on renormalized prefixes (value and
gradient), for every objective, with presence masks, exact accumulation and two processes."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate import Accelerator

import mmalign.dist
from mmalign.batch import Batch
from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.objectives import build_objective
from mmalign.objectives.matryoshka import MatryoshkaObjective
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from tests.objectives.test_distributed import (
    MODALITIES,
    ROWS_PER_RANK,
    _batch,
    _free_port,
    _step,
    _TinyModel,
)

DIMS, WEIGHTS = [2, 4, 6], [0.5, 1.0, 2.0]
CONFIGS = [
    {"name": "clip"},
    {"name": "anchored", "anchor": "b"},
    {"name": "sigmoid"},
    {"name": "symile", "negatives": "n"},
    {"name": "symile", "negatives": "n2", "block_size": 3},
]

DISTRIBUTED = [CONFIGS[0], CONFIGS[-1]]  # clip and symile n2 (process start-up dominates)


def _leaves(rows: int = 7, dim: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        m: F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)
        .detach()
        .requires_grad_(True)
        for m in MODALITIES
    }


def _mask(rows: int = 7) -> torch.Tensor:
    present = torch.ones(rows, 3, dtype=torch.bool)
    present[0, 1] = present[3, 2] = present[5, 0] = False
    return present


def _zeroed(leaves: dict[str, torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
    return {m: leaf * present[:, j, None] for j, (m, leaf) in enumerate(leaves.items())}


def _args(config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = torch.tensor(-1.0, dtype=torch.float64) if config["name"] == "sigmoid" else None
    return torch.tensor(5.0, dtype=torch.float64), bias


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['name']}-{c.get('negatives', '')}")
def test_loss_and_gradient_equal_weighted_sum_over_renormalized_prefixes(config: dict) -> None:
    scale, bias = _args(config)
    present = _mask()
    leaves = _leaves()
    wrapped = MatryoshkaObjective(build_objective(config), DIMS, WEIGHTS)
    out = wrapped(_zeroed(leaves, present), scale, bias, present, torch.Generator().manual_seed(5))
    out.loss.backward()
    grads = {m: leaf.grad.clone() for m, leaf in leaves.items()}

    by_hand = _leaves()
    plain, generator = build_objective(config), torch.Generator().manual_seed(5)
    total, values = 0.0, {}
    for dim, weight in zip(DIMS, WEIGHTS):
        prefixes = {
            m: F.normalize(e[:, :dim], dim=-1) for m, e in _zeroed(by_hand, present).items()
        }
        loss = plain(prefixes, scale, bias, present, generator).loss
        values[dim] = loss.item()
        total = total + weight * loss
    total.backward()

    torch.testing.assert_close(out.loss, total, rtol=1e-12, atol=0)
    assert out.metrics["loss"] == pytest.approx(total.item(), rel=1e-12)
    assert {d: out.metrics[f"loss/dim{d}"] for d in DIMS} == pytest.approx(values, rel=1e-12)
    assert values[2] != pytest.approx(values[6])  # the prefixes really differ
    for m in MODALITIES:
        torch.testing.assert_close(grads[m], by_hand[m].grad, rtol=1e-10, atol=1e-12)
        assert grads[m].abs().sum() > 0


def _naive_clip(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE in float64, written out row by row."""
    rows = a.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(rows):
        logits_ab = torch.stack([scale * torch.dot(a[i], b[j]) for j in range(rows)])
        logits_ba = torch.stack([scale * torch.dot(b[i], a[j]) for j in range(rows)])
        total = total - (logits_ab[i] - torch.logsumexp(logits_ab, 0)) / 2
        total = total - (logits_ba[i] - torch.logsumexp(logits_ba, 0)) / 2
    return total / rows


def test_clip_matryoshka_equals_a_naive_reference() -> None:
    leaves = {m: v for m, v in _leaves().items() if m in ("a", "b")}
    out = MatryoshkaObjective(build_objective({"name": "clip"}), DIMS, WEIGHTS)(
        leaves, torch.tensor(5.0, dtype=torch.float64)
    )
    expected = sum(
        w
        * _naive_clip(
            *(v[:, :d] / v[:, :d].norm(dim=1, keepdim=True) for v in leaves.values()), 5.0
        )
        for d, w in zip(DIMS, WEIGHTS)
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)


def test_model_config_wraps_the_objective_and_checks_prefixes() -> None:
    towers = {m: {"type": "tabular", "in_features": 3} for m in ("a", "b")}
    model = AlignmentModel.from_config(
        {"dim": 6, "towers": towers, "matryoshka": DIMS, "matryoshka_weights": WEIGHTS}
    )
    assert isinstance(model.objective, MatryoshkaObjective)
    assert (model.objective.dims, model.objective.weights) == (DIMS, WEIGHTS)
    for bad, words in [
        ({"matryoshka": [4, 2, 6]}, "ascending"),
        ({"matryoshka": [2, 4]}, "end with model.dim"),
        ({"matryoshka": DIMS, "matryoshka_weights": [1.0]}, "one weight"),
        ({"matryoshka_weights": [1.0]}, "needs matryoshka"),
    ]:
        with pytest.raises(ConfigError, match=words):
            AlignmentModel.from_config({"dim": 6, "towers": towers, **bad})


def _model(objective: dict) -> AlignmentModel:
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 8} for name in MODALITIES}
    torch.manual_seed(0)
    config = {"dim": 6, "towers": towers, "objective": objective, "matryoshka": DIMS}
    return AlignmentModel.from_config(config | {"matryoshka_weights": WEIGHTS}).double()


def _loader_batch(raw: dict[str, torch.Tensor], present: torch.Tensor) -> Batch:
    inputs = {name: raw[name][present[:, j]] for j, name in enumerate(MODALITIES)}
    keys = [str(row) for row in range(present.shape[0])]
    return Batch(keys=keys, modalities=list(MODALITIES), inputs=inputs, present=present)


@pytest.mark.parametrize("objective", [{"name": "clip"}, {"name": "symile", "negatives": "n2"}])
def test_exact_accumulation_equals_the_big_batch(objective: dict) -> None:
    micro, count = 4, 3
    generator = torch.Generator().manual_seed(1)
    raw = {
        m: torch.randn(micro * count, 3, generator=generator, dtype=torch.float64)
        for m in MODALITIES
    }
    present = torch.ones(micro * count, 3, dtype=torch.bool)
    present[1, 0] = present[4, 2] = present[7, 1] = False

    reference = _model(objective)
    big = _loader_batch(raw, present)
    expected_loss = reference.loss(reference(big), big, torch.Generator().manual_seed(9)).loss
    expected_loss.backward()

    step = ContrastiveStep(_model(objective))
    micro_batches = [
        _loader_batch(
            {n: v[i * micro : (i + 1) * micro] for n, v in raw.items()},
            present[i * micro : (i + 1) * micro],
        )
        for i in range(count)
    ]
    outcome = accumulated_step(
        Accelerator(), step, micro_batches, lambda: torch.Generator().manual_seed(9)
    )
    assert outcome.loss == pytest.approx(expected_loss.item(), rel=1e-12)
    actual = dict(step.model.named_parameters())
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(actual[name].grad, parameter.grad, rtol=1e-9, atol=1e-12)


def _matryoshka(config: dict) -> MatryoshkaObjective:
    return MatryoshkaObjective(build_objective(config), DIMS, WEIGHTS)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert mmalign.dist.world_size() == 2
        inputs, present = _batch()
        start = sum(ROWS_PER_RANK[:rank])
        rows = slice(start, start + ROWS_PER_RANK[rank])
        results = {}
        for index, config in enumerate(DISTRIBUTED):
            module = _TinyModel(with_bias=config["name"] == "sigmoid")
            model = DistributedDataParallel(module)
            results[index] = _step(model, module, _matryoshka(config), inputs[rows], present[rows])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.launches
def test_two_processes_equal_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    inputs, present = _batch()
    for index, config in enumerate(DISTRIBUTED):
        module = _TinyModel(with_bias=config["name"] == "sigmoid")
        single = _step(module, module, _matryoshka(config), inputs, present)
        distributed = [result[index] for result in ranks]
        mean_loss = (distributed[0]["loss"] + distributed[1]["loss"]) / 2
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=0, msg=str(config))
        for result in distributed:
            for dim in DIMS:
                key = f"loss/dim{dim}"
                assert result["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-10)
            for name, grad in single["parameter_grads"].items():
                torch.testing.assert_close(
                    result["parameter_grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name
                )
        for m in MODALITIES:
            gathered = torch.cat([result["embedding_grads"][m] for result in distributed]) / 2
            torch.testing.assert_close(
                gathered, single["embedding_grads"][m], rtol=1e-9, atol=1e-12
            )
