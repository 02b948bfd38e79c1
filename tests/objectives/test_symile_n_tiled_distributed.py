"""Symile ``negatives: n`` in tiles across two gloo processes equals one dense process holding
the whole batch (uneven rows per rank, missing modalities, groups, every ``positives`` mode),
and with ``gather_with_grad: false`` equals the dense path of the same processes. A module of
its own so that the spawned workers import only torch and mmalign."""

import pytest
import torch
import torch.multiprocessing as mp

from mmalign.objectives import build_objective
from tests.objectives.test_distributed import _batch, _free_port, _step, _TinyModel

DISTRIBUTED = [
    {"tile": 2},
    {"tile": 3, "positives": "multi"},
    {"tile": 2, "positives": "exclude"},
    {"tile": 3, "positives": "debiased"},
    {"tile": 2, "gather_with_grad": False},
]
ROWS = [5, 3]
GROUPS = torch.tensor([4, 1, 4, 2, 1, 2, 4, 3])


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {"world_size": dist.get_world_size()}
        inputs, present = _batch()
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        for index, config in enumerate(DISTRIBUTED):
            for tile in (config["tile"], "none"):  # without the gather's gradient: vs dense
                module = _TinyModel(with_bias=False)
                objective = build_objective({"name": "symile", **config, "tile": tile})
                model = DistributedDataParallel(module)
                step = _step(model, module, objective, inputs[rows], present[rows], GROUPS[rows])
                results[index, tile] = step
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_steps_equal(ours, theirs, message):
    torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-10, atol=0, msg=message)
    for name, grad in theirs["parameter_grads"].items():
        torch.testing.assert_close(
            ours["parameter_grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name
        )


@pytest.mark.launches
def test_tiled_n_across_two_processes_equals_one_dense_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [result["world_size"] for result in ranks] == [2, 2]
    inputs, present = _batch()
    for index, config in enumerate(DISTRIBUTED):
        tiled = [result[index, config["tile"]] for result in ranks]
        for rank, result in enumerate(ranks):  # the same process, dense: equal in any case
            _assert_steps_equal(tiled[rank], result[index, "none"], f"{config} rank {rank}")
        if not config.get("gather_with_grad", True):
            continue
        module = _TinyModel(with_bias=False)
        dense = build_objective({"name": "symile", **config, "tile": "none"})
        single = _step(module, module, dense, inputs, present, GROUPS)
        mean_loss = (tiled[0]["loss"] + tiled[1]["loss"]) / 2
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=0, msg=str(config))
        for result in tiled:
            _assert_steps_equal({**result, "loss": single["loss"]}, single, str(config))
        for m, grad in single["embedding_grads"].items():
            gathered = torch.cat([result["embedding_grads"][m] for result in tiled])
            torch.testing.assert_close(gathered / 2, grad, rtol=1e-9, atol=1e-12, msg=str(config))
