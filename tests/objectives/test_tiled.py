"""Tiled pairwise losses (``model.objective.tile``) equal the dense path and open_clip's
``ClipLoss``/``SigLipLoss`` in value and gradients: batches that are not a multiple of the
tile, presence masks, every ``positives`` mode, hard negatives, Matryoshka prefixes, K = 3
exact accumulation and two gloo processes."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmalign.errors import ConfigError
from mmalign.objectives import build_objective
from mmalign.objectives.matryoshka import MatryoshkaObjective
from mmalign.objectives.tiled import EntryDrop, pair_logsumexp, pair_softplus_sum, tile_size
from tests.objectives.test_distributed import _batch, _free_port, _step, _TinyModel
from tests.objectives.test_positives import HOLES, TAU_PLUS, _embeddings, _groups, _present


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def _assert_same(ours, theirs, tensors, rtol):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * 1e-2)
    for mine, reference in zip(_grads(ours, tensors), _grads(theirs, tensors), strict=True):
        torch.testing.assert_close(mine, reference, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("kind", [None, "own", "same_group", "same_group_and_own"])
def test_kernel_equals_dense_row_and_column_logsumexp_and_softplus(kind):
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(13, 5, dtype=torch.float64, generator=generator).requires_grad_()
    keys = torch.randn(11, 5, dtype=torch.float64, generator=generator).requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 3, (13,), generator=generator)
    drop = None
    if kind is not None:
        drop = EntryDrop(kind, torch.arange(13), torch.arange(11), groups, groups[:11])
    logits = scale * queries @ keys.T
    if drop is not None:
        logits = logits.masked_fill(drop.tile(slice(None), slice(None)), float("-inf"))
    weights = torch.randn(24, dtype=torch.float64, generator=generator)
    rows, columns = pair_logsumexp(queries, keys, scale, drop, tile=4)
    ours = torch.cat([rows, columns]) @ weights
    theirs = torch.cat([logits.logsumexp(dim=1), logits.logsumexp(dim=0)]) @ weights
    _assert_same(ours, theirs, [queries, keys, scale], rtol=1e-10)
    tiled = pair_softplus_sum(queries, keys, scale, bias, drop, tile=4)
    dense = F.softplus(logits + bias).sum()
    _assert_same(tiled, dense, [queries, keys, scale, bias], rtol=1e-10)


def _float32_pair(rows=37, dim=16):
    generator = torch.Generator().manual_seed(0)
    return {
        name: F.normalize(torch.randn(rows, dim, generator=generator), dim=-1).requires_grad_()
        for name in ("image", "text")
    }


def test_tiled_clip_equals_dense_and_open_clip_in_float32():
    emb = _float32_pair()
    scale = torch.tensor(20.0, requires_grad=True)
    tensors = [*emb.values(), scale]
    tiled = build_objective({"name": "clip", "tile": 8})(emb, scale).loss
    dense = build_objective({"name": "clip", "tile": "none"})(emb, scale).loss
    reference = ClipLoss()(emb["image"], emb["text"], scale)
    _assert_same(tiled, reference, tensors, rtol=1e-5)
    _assert_same(tiled, dense, tensors, rtol=1e-5)


def test_tiled_sigmoid_equals_dense_and_open_clip_in_float32():
    emb = _float32_pair()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    tensors = [*emb.values(), scale, bias]
    tiled = build_objective({"name": "sigmoid", "tile": 8})(emb, scale, bias).loss
    dense = build_objective({"name": "sigmoid", "tile": "none"})(emb, scale, bias).loss
    reference = SigLipLoss()(emb["image"], emb["text"], scale, bias)
    _assert_same(tiled, reference, tensors, rtol=1e-5)
    _assert_same(tiled, dense, tensors, rtol=1e-5)


def _configs():
    for name in ("clip", "anchored", "sigmoid"):
        for mode in ("instance", "multi", "exclude", "debiased"):
            if name == "sigmoid" and mode == "debiased":
                continue
            for hard in (False, True):
                config = {"name": name, "positives": mode, "tau_plus": TAU_PLUS}
                config["hard_negatives"] = hard
                if name == "anchored":
                    config["anchor"] = "b"
                yield config


@pytest.mark.parametrize("config", list(_configs()), ids=str)
def test_tiled_equals_dense_with_masks_groups_and_every_positives_mode(config):
    emb, groups = _embeddings(["a", "b", "c"]), _groups()
    present = _present(15, 3, HOLES)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    tensors = [*emb.values(), scale, bias]

    def loss(tile):
        objective = build_objective({**config, "tile": tile})
        out = objective(emb, scale, bias, present=present, groups=groups)
        return out.loss + 0.0 * bias  # the softmax objectives ignore the bias

    _assert_same(loss(4), loss("none"), tensors, rtol=1e-10)


def test_tiled_matryoshka_equals_dense():
    emb = _embeddings(["a", "b"], rows=11, dim=8)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    present = _present(11, 2, [(2, 0), (5, 1)])

    def loss(tile):
        objective = MatryoshkaObjective(build_objective({"name": "clip", "tile": tile}), [2, 4, 8])
        return objective(emb, scale, present=present).loss

    _assert_same(loss(3), loss("none"), [*emb.values(), scale], rtol=1e-10)


def test_tile_must_be_positive():
    with pytest.raises(ConfigError, match=r"model\.objective\.tile"):
        build_objective({"name": "clip", "tile": 0})


@pytest.mark.parametrize("name", ["clip", "sigmoid"])
def test_accumulated_tiled_gradients_equal_dense_big_batch(name):
    from accelerate import Accelerator

    from mmalign.training.accumulation import ContrastiveStep, accumulated_step
    from tests.training.test_accumulation import _batch as loader_batch
    from tests.training.test_accumulation import _data, _model, _seeded
    from tests.training.test_accumulation import _grads as model_grads

    micro, count = 4, 3
    raw, present = _data(micro * count, missing=True)
    reference = _model({"name": name, "tile": "none"})
    big = loader_batch(raw, present)
    reference.loss(reference(big), big, _seeded()).loss.backward()
    step = ContrastiveStep(_model({"name": name, "tile": 5}))
    micro_batches = [
        loader_batch(
            {n: v[i * micro : (i + 1) * micro] for n, v in raw.items()},
            present[i * micro : (i + 1) * micro],
        )
        for i in range(count)
    ]
    assert accumulated_step(Accelerator(), step, micro_batches, _seeded).finite
    expected, got = model_grads(reference), model_grads(step.model)
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-9, atol=1e-12, msg=key)


DISTRIBUTED = [
    {"name": "clip", "tile": 2},
    {"name": "anchored", "anchor": "b", "tile": 3},
    {"name": "sigmoid", "tile": 2},
    {"name": "clip", "tile": 2, "positives": "multi"},
    {"name": "clip", "tile": 3, "positives": "exclude", "hard_negatives": True},
    {"name": "clip", "tile": 2, "positives": "debiased"},
    {"name": "sigmoid", "tile": 3, "positives": "exclude"},
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
            module = _TinyModel(with_bias=config["name"] == "sigmoid")
            objective = build_objective(config)
            model = DistributedDataParallel(module)
            step = _step(model, module, objective, inputs[rows], present[rows], GROUPS[rows])
            results[index] = step
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.launches
def test_tiled_across_two_processes_equals_one_dense_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [result["world_size"] for result in ranks] == [2, 2]
    inputs, present = _batch()
    for index, config in enumerate(DISTRIBUTED):
        module = _TinyModel(with_bias=config["name"] == "sigmoid")
        dense = build_objective({**config, "tile": "none"})
        single = _step(module, module, dense, inputs, present, GROUPS)
        mean_loss = (ranks[0][index]["loss"] + ranks[1][index]["loss"]) / 2
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=0, msg=str(config))
        for result in (ranks[0][index], ranks[1][index]):
            for name, grad in single["parameter_grads"].items():
                torch.testing.assert_close(
                    result["parameter_grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name
                )
        for m, grad in single["embedding_grads"].items():
            gathered = torch.cat(
                [ranks[0][index]["embedding_grads"][m], ranks[1][index]["embedding_grads"][m]]
            )
            torch.testing.assert_close(gathered / 2, grad, rtol=1e-9, atol=1e-12, msg=str(config))


def test_auto_tiles_from_2048_rows_and_none_stays_dense():
    assert tile_size("auto", 2047) is None
    assert tile_size("auto", 2048) == 2048
    assert tile_size("none", 10**6) is None
    assert tile_size(96, 10) == 96
