"""``train.strategy: fsdp`` with two real processes (torchrun, gloo on CPU): the model is really
sharded, trains to the parameters of a DDP run (clip, Symile n2, and clip with the two_view,
distill and queue terms; accumulation and clipping on, validation included), checkpoints are
saved sharded and survive a kill in the middle of a save, the final model is consolidated for
``from_pretrained``, and the run says what ran."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import yaml
from torch.distributed.tensor import DTensor, Shard

from mmalign.config import ConfigError, load_config
from mmalign.errors import UserError
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.checks import check_run_config
from mmalign.training.parallel import check_launch
from mmalign.training.parallel.base import check_group
from mmalign.training.parallel.fsdp import shard_model
from mmalign.training.parallel.sharded_checkpoint import SafeReader
from tests.train_support import (
    finish,
    free_port,
    metrics,
    model_weights,
    start_launch,
    tiny_config,
    write_shards,
)

INJECT = Path(__file__).parents[1] / "reliability" / "inject.py"
OBJECTIVES = {
    "clip": {"name": "clip"},
    "symile": {"name": "symile", "negatives": "n2"},
    "terms": {"name": "clip"},  # with two_view, distill and queue terms (_terms)
}
TRAIN = {"steps": 5, "accumulate": 2, "grad_clip": 0.05, "save_every": 2}


def _terms(root: Path) -> dict:
    """The model section of the ``terms`` runs: x's second view (feature masking), a saved
    teacher of another width, and a queue."""
    towers = {name: {"type": "tabular", "in_features": 4, "hidden": 16} for name in "xy"}
    teacher = root / "teacher"
    if not teacher.exists():
        torch.manual_seed(7)
        AlignmentModel.from_config({"dim": 6, "towers": towers}).save_pretrained(teacher)
    terms = [
        {"type": "two_view", "modality": "x", "weight": 0.5},
        {"type": "distill", "teacher": str(teacher), "temperature": 0.2},
        {"type": "queue", "size": 12},
    ]
    towers["x"]["augment_feature_mask"] = 0.5
    return {"towers": towers, "objective": {**OBJECTIVES["terms"], "terms": terms}}


def _config(root: Path, name: str, objective: str, strategy: str) -> Path:
    """A 2-process run config: 2 x 8 training records per step (4 per micro-batch)."""
    data = root / "data"
    model = _terms(root) if objective == "terms" else {"objective": OBJECTIVES[objective]}
    config = tiny_config(
        root / name,
        str(data / "train-{000000..000001}.tar"),
        str(data / "val-{000000..000001}.tar") if objective == "clip" else None,
        model=model,
        train={**TRAIN, "strategy": strategy},
        data={"batch_size": 4},
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _resume(config: Path) -> None:
    log = config.with_suffix(".resumed.log")
    launched = start_launch(["-m", "mmalign", "train", str(config), "--resume"], log)
    status, output = finish(launched, log)
    assert status == 0, output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP and DDP runs of clip and Symile n2 under one root (launched together)."""
    root = tmp_path_factory.mktemp("fsdp")
    write_shards(root / "data", "train", shards=2, per_shard=8, missing=0.25)
    write_shards(root / "data", "val", shards=2, per_shard=8, seed=1)
    started = []
    for objective in OBJECTIVES:
        for strategy in ("fsdp", "ddp"):
            config = _config(root, f"{objective}-{strategy}", objective, strategy)
            log = config.with_suffix(".log")
            started.append((start_launch(["-m", "mmalign", "train", str(config)], log), log))
    for process, log in started:
        status, output = finish(process, log)
        assert status == 0, output
    return root


@pytest.mark.timeout(900)  # the first test using the fixture waits for its launches
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.launches
def test_fsdp_trains_to_the_parameters_of_ddp(runs: Path, objective: str) -> None:
    fsdp, ddp = model_weights(runs / f"{objective}-fsdp"), model_weights(runs / f"{objective}-ddp")
    assert fsdp.keys() == ddp.keys()
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-6, msg=name)
    initial = AlignmentModel.from_config(load_config(runs / f"{objective}-ddp.yaml").model)
    moved = max(float((ddp[k] - v).abs().max()) for k, v in initial.state_dict().items())
    assert moved > 1e-3  # both trained; equal parameters are not the initial ones
    records = {s: metrics(runs / f"{objective}-{s}") for s in ("fsdp", "ddp")}
    norms = [r["train/grad_norm"] for r in records["fsdp"] if "train/grad_norm" in r]
    assert len(norms) == TRAIN["steps"] and min(norms) > TRAIN["grad_clip"]  # clipping acted
    expected = [r["train/grad_norm"] for r in records["ddp"] if "train/grad_norm" in r]
    assert norms == pytest.approx(expected, rel=1e-4)
    if objective == "clip":  # validation: same loss and recall as DDP
        fsdp_val, ddp_val = ([r for r in records[s] if "val/loss" in r][-1] for s in records)
        assert fsdp_val == pytest.approx(ddp_val, rel=1e-4)
    if objective == "terms":  # each term's loss too; the queue took every step's batch
        for name in ("main", "two_view_x", "distill", "queue"):
            found = [r[f"train/loss/{name}"] for r in records["fsdp"] if "train/loss" in r]
            wanted = [r[f"train/loss/{name}"] for r in records["ddp"] if "train/loss" in r]
            assert len(found) == TRAIN["steps"] and found == pytest.approx(wanted, rel=1e-4)
        assert int(fsdp["objective.queue.x_count"]) == 12


def _shard_report(rank: int, port: int, output: str) -> None:
    """One of two spawned processes: shard a tiny model, report each parameter's placement
    and local element count."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from mmalign.training.accumulation import ContrastiveStep
    from mmalign.training.parallel.fsdp import FullySharded

    config = tiny_config(Path(output), "unused")["model"]
    step, optimizer = FullySharded(accelerator=None).prepare(
        ContrastiveStep(AlignmentModel.from_config(config)),
        lambda m: torch.optim.SGD(m.parameters()),
    )
    report = {
        name: {
            "sharded": isinstance(p, DTensor) and p.placements == (Shard(0),),
            "local": (p.to_local() if isinstance(p, DTensor) else p).numel(),
            "total": p.numel(),
            "in_optimizer": any(p is q for q in optimizer.param_groups[0]["params"]),
        }
        for name, p in step.model.named_parameters()
    }
    Path(output, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.launches
def test_parameters_are_sharded_across_the_two_processes(tmp_path: Path, runs: Path) -> None:
    mp.spawn(_shard_report, args=(free_port(), str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, entry in reports[0].items():
        assert entry["in_optimizer"], name  # the optimizer holds the sharded parameters
        if name == "logit_scale":  # 0-d: FSDP2 cannot shard it, kept whole on every rank
            assert not entry["sharded"] and entry["local"] == entry["total"] == 1
            continue
        assert entry["sharded"], name
        locals_ = [reports[rank][name]["local"] for rank in (0, 1)]
        assert sum(locals_) == entry["total"], name  # the two shards make up the parameter
        assert max(locals_) <= -(-entry["total"] // 2), name  # each holds about half
    # the trained run's checkpoint: each rank wrote its own half of the weights
    shards = sorted(
        (runs / "clip-fsdp" / "checkpoints" / "step-00000005" / "sharded").glob("*.distcp")
    )
    sizes = [path.stat().st_size for path in shards]
    assert len(sizes) == 2 and min(sizes) > 0.3 * sum(sizes)


@pytest.mark.launches
def test_consolidated_model_equals_the_sharded_parameters(runs: Path) -> None:
    run = runs / "clip-fsdp"
    loaded = AlignmentModel.from_pretrained(run / "model")  # no FSDP, no process group
    template = {f"model/{k}": torch.zeros_like(v) for k, v in loaded.state_dict().items()}
    dcp.load(template, storage_reader=SafeReader(run / "checkpoints" / "step-00000005" / "sharded"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, template[f"model/{name}"]), name


class _CodeExecuting:
    """A pickle that, when loaded, creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_checkpoint_metadata_never_runs_code(tmp_path: Path) -> None:
    shards, marker = tmp_path / "sharded", tmp_path / "ran"
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(_CodeExecuting(marker)))
    with pytest.raises(UserError, match="is not checkpoint metadata"):
        SafeReader(shards).read_metadata()
    assert not marker.exists()


@pytest.mark.launches
def test_run_says_what_ran(runs: Path) -> None:
    for strategy, shown in (("fsdp", "FSDP"), ("ddp", "DDP")):
        info = json.loads((runs / f"clip-{strategy}" / "run.json").read_text())
        assert info["strategy"] == shown and info["world_size"] == 2
        assert (info["nodes"], info["processes_per_node"], info["precision"]) == (1, 2, "fp32")
        log = (runs / f"clip-{strategy}" / "train.log").read_text()
        assert f"{shown}, world size 2 (1 node x 2 processes), precision fp32" in log


@pytest.mark.timeout(600)
@pytest.mark.launches
def test_kill_during_sharded_save_then_resume_equals_uninterrupted(runs: Path) -> None:
    config = _config(runs, "killed", "clip", "fsdp")
    # both ranks die right after writing their shards of the second checkpoint (step 4),
    # before trainer.json and the rename: a torn .tmp-step-00000004 is left behind
    kill = "mmalign.training.parallel.sharded_checkpoint:save:2:after"
    log = runs / "killed.log"
    killed = start_launch([str(INJECT), "--kill", kill, "--", "train", str(config)], log)
    status, _ = finish(killed, log)
    assert status != 0
    checkpoints = runs / "killed" / "checkpoints"
    assert (checkpoints / ".tmp-step-00000004" / "sharded").is_dir()
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002"]
    _resume(config)
    assert not (checkpoints / ".tmp-step-00000004").exists()
    expected, resumed = model_weights(runs / "clip-fsdp"), model_weights(runs / "killed")
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.launches
def test_resume_with_another_world_size_is_refused(runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs / "symile-fsdp", run)
    overrides = [f"train.output={run}", "train.steps=6"]
    with pytest.raises(UserError, match=r"saved sharded by 2 processes.*train\.strategy fsdp"):
        train(runs / "symile-fsdp.yaml", overrides, resume=True)


@pytest.mark.launches
def test_launch_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path, "unused"))
    with pytest.raises(UserError, match="deepspeed package is not installed"):
        check_launch(config, {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match=r"add --set train\.strategy=fsdp"):
        check_launch(config, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(UserError, match="WORLD_SIZE=2 processes but they did not form"):
        check_group(1, {"WORLD_SIZE": "2"})
    check_group(2, {"WORLD_SIZE": "2"})
    fp16 = load_config(
        tiny_config(tmp_path, "unused", train={"strategy": "fsdp", "precision": "fp16"})
    )
    with pytest.raises(ConfigError, match=r"fp16 is not supported with train\.strategy fsdp"):
        check_run_config(fp16)
    ema = load_config(tiny_config(tmp_path, "unused", train={"strategy": "fsdp", "ema": 0.9}))
    with pytest.raises(ConfigError, match=r"train\.ema: a weight average is not kept"):
        check_run_config(ema)


IMAGE = {
    "type": "image",
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
}


def test_a_tower_returning_a_view_gets_the_unsharded_gradients_without_warnings() -> None:
    """open_clip's ModifiedResNet returns a view, which FSDP2 warns about at every forward
    ("may produce wrong gradients" after an in-place op). The model applies none: in one
    gloo process the sharded model's gradients equal the unsharded copy's, and the notice
    (noise here) is silenced, while other warnings still show."""
    model = AlignmentModel.from_config(
        {"dim": 4, "towers": {"image": IMAGE, "labs": {"type": "tabular", "in_features": 3}}}
    )
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(4, 3, 32, 32, generator=generator), "labs": torch.randn(4, 3)}
    with torch.no_grad():
        assert reference.towers["image"](inputs["image"])._base is not None  # a view
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        shard_model(model)
        with warnings.catch_warnings(record=True) as caught:
            embedded = model(inputs)
            (embedded["image"] * embedded["labs"]).sum().backward()
            warnings.warn("a real warning still shows", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["a real warning still shows"]
        expected = reference(inputs)
        (expected["image"] * expected["labs"]).sum().backward()
        for (name, found), (_, wanted) in zip(
            model.named_parameters(), reference.named_parameters()
        ):
            grad = found.grad.full_tensor() if isinstance(found.grad, DTensor) else found.grad
            torch.testing.assert_close(grad, wanted.grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()
