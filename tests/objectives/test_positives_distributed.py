"""Same-group positives across processes and micro-batches: 2 real processes (gloo) and exact
accumulation (K = 3) equal one process holding the whole batch, for every positives mode (and
with hard negatives: rows missing the query modality as extra candidates)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from mmalign.objectives import build_objective
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from tests.objectives.test_distributed import (
    MODALITIES,
    ROWS_PER_RANK,
    _batch,
    _free_port,
    _step,
    _TinyModel,
)
from tests.training.test_accumulation import _batch as _loader_batch
from tests.training.test_accumulation import _data, _grads, _model, _seeded

MODES = ["instance", "multi", "exclude", "debiased"]
CONFIGS = [
    *({"name": "clip", "positives": mode, "tau_plus": 0.2} for mode in MODES),
    *({"name": "anchored", "anchor": "b", "positives": mode} for mode in MODES),
    *({"name": "sigmoid", "positives": mode} for mode in ("multi", "exclude")),
    *({"name": "symile", "negatives": "n", "positives": mode, "tau_plus": 0.2} for mode in MODES),
    *(
        {"name": "symile", "negatives": "n2", "positives": mode, "block_size": 4, "tau_plus": 0.2}
        for mode in ("multi", "exclude", "debiased")
    ),
    {"name": "clip", "positives": "multi", "hard_negatives": True},
    {"name": "sigmoid", "positives": "exclude", "hard_negatives": True},
]
# groups spanning both ranks (rows 0-4 on rank 0, rows 5-7 on rank 1), sizes 1..3
GROUPS = torch.tensor([40, 7, 40, 9, 7, 40, 9, 12])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        inputs, present = _batch()
        start = sum(ROWS_PER_RANK[:rank])
        rows = slice(start, start + ROWS_PER_RANK[rank])
        results = {}
        for index, config in enumerate(CONFIGS):
            module = _TinyModel(with_bias=config["name"] == "sigmoid")
            model = DistributedDataParallel(module)
            results[index] = _step(
                model, module, build_objective(config), inputs[rows], present[rows], GROUPS[rows]
            )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.launches
def test_two_processes_equal_one_process_for_every_mode(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    inputs, present = _batch()
    for index, config in enumerate(CONFIGS):
        module = _TinyModel(with_bias=config["name"] == "sigmoid")
        single = _step(module, module, build_objective(config), inputs, present, GROUPS)
        if config.get("positives") in ("multi", "exclude"):
            plain = _TinyModel(with_bias=config["name"] == "sigmoid")
            ungrouped = _step(plain, plain, build_objective(config), inputs, present)
            assert abs(ungrouped["loss"].item() - single["loss"].item()) > 1e-6, config
        distributed = [result[index] for result in ranks]
        mean_loss = (distributed[0]["loss"] + distributed[1]["loss"]) / 2
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=0, msg=str(config))
        for result in distributed:
            assert abs(result["metric_loss"] - single["loss"].item()) < 1e-10, config
            for name, grad in single["parameter_grads"].items():
                torch.testing.assert_close(
                    result["parameter_grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name
                )
        for m in MODALITIES:
            gathered = torch.cat([result["embedding_grads"][m] for result in distributed]) / 2
            torch.testing.assert_close(
                gathered, single["embedding_grads"][m], rtol=1e-9, atol=1e-12
            )


def test_accumulation_keeps_groups_for_every_mode():
    micro, count = 4, 3
    raw, present = _data(micro * count, missing=True)
    groups = torch.tensor([3, 5, 3, 8, 5, 3, 1, 8, 5, 2, 2, 3])
    for config in CONFIGS:
        if config["name"] == "anchored":
            config = {**config, "anchor": "a"}
        reference = _model(config)
        big = _loader_batch(raw, present)
        big.groups = groups
        output = reference.loss(reference(big), big, _seeded())
        output.loss.backward()
        expected = _grads(reference)

        step = ContrastiveStep(_model(config))
        parts = []
        for i in range(count):
            rows = slice(i * micro, (i + 1) * micro)
            part = _loader_batch({n: v[rows] for n, v in raw.items()}, present[rows])
            part.groups = groups[rows]
            parts.append(part)
        outcome = accumulated_step(Accelerator(), step, parts, _seeded)
        assert abs(outcome.loss - float(output.loss.detach())) < 1e-10, config
        actual = _grads(step.model)
        assert expected.keys() == actual.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(actual[name], grad, rtol=1e-9, atol=1e-12, msg=name)
