"""Symile ``negatives: n`` in tiles (``model.objective.tile``) equals the dense path and the
``symile`` package in value and gradients: batches that are not a multiple of the tile,
presence masks, groups with every ``positives`` mode, and two gloo processes (with and
without the gather's gradient)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from symile import Symile

from mmalign.objectives import build_objective, symile_n
from tests.objectives.test_distributed import _batch, _free_port, _step, _TinyModel
from tests.objectives.test_positives import HOLES, MODES, TAU_PLUS, _embeddings, _groups, _present
from tests.objectives.test_tiled import _assert_same


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_tiled_n_equals_dense_with_masks_groups_and_every_positives_mode(mode, count):
    names = ["a", "b", "c", "d"][:count]
    emb, groups = _embeddings(names, dim=5, seed=count), _groups(seed=count)
    present = _present(15, count, HOLES if count == 3 else [*HOLES, (5, 3), (6, 3)])
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    config = {"name": "symile", "negatives": "n", "positives": mode, "tau_plus": TAU_PLUS}

    def loss(tile):
        objective = build_objective({**config, "tile": tile})
        generator = torch.Generator().manual_seed(5)
        return objective(emb, scale, present=present, groups=groups, generator=generator).loss

    _assert_same(loss(4), loss("none"), [*emb.values(), scale], rtol=1e-10)


def _float32_triple(rows=37, dim=16):
    generator = torch.Generator().manual_seed(0)
    return {
        name: F.normalize(torch.randn(rows, dim, generator=generator), dim=-1).requires_grad_()
        for name in ("x", "y", "z")
    }


def test_tiled_n_equals_dense_and_the_symile_package_in_float32():
    emb = _float32_triple()
    scale = torch.tensor(20.0, requires_grad=True)
    tensors = [*emb.values(), scale]
    losses = {}
    for name, tile in (("tiled", 8), ("dense", "none")):
        torch.manual_seed(123)  # the permutations: torch's default generator, as the package
        losses[name] = build_objective({"name": "symile", "tile": tile})(emb, scale).loss
    torch.manual_seed(123)
    reference = Symile("n")(list(emb.values()), scale)
    _assert_same(losses["tiled"], reference, tensors, rtol=1e-5)
    _assert_same(losses["tiled"], losses["dense"], tensors, rtol=1e-5)


def test_tiled_n_with_missing_modalities_equals_dense_in_float32():
    emb = _float32_triple()
    present = _present(37, 3, [*HOLES, (20, 1), (36, 2), (36, 0)])
    scale = torch.tensor(20.0, requires_grad=True)

    def loss(tile):
        objective = build_objective({"name": "symile", "tile": tile})
        return objective(emb, scale, present=present, generator=torch.Generator().manual_seed(1))

    tiled, dense = loss(8), loss("none")
    _assert_same(tiled.loss, dense.loss, [*emb.values(), scale], rtol=1e-5)
    assert tiled.metrics.keys() == dense.metrics.keys()


def test_auto_tiles_symile_n_from_2048_rows(monkeypatch):
    calls = []
    kernel = symile_n.pair_logsumexp
    monkeypatch.setattr(
        symile_n, "pair_logsumexp", lambda *args: (calls.append(args[-1]), kernel(*args))[1]
    )
    objective = build_objective({"name": "symile"})
    for rows in (2047, 2048):
        emb = {m: F.normalize(torch.randn(rows, 4), dim=-1) for m in "xyz"}
        objective(emb, torch.tensor(5.0))
    assert calls == [2048] * 3  # one tiled pass per anchor at 2048 rows, none below


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
