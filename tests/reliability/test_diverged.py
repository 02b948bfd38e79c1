"""A diverging run is stopped, never saved and never called done; the advice it prints works
when followed; an export refuses a diverged model and never marks a NaN row present."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import fork_mmalign, tiny_config, write_config
from safetensors.torch import load_file, save_file

from mmalign.data.exports import ExportError
from mmalign.export import run_export
from mmalign.model import AlignmentModel
from mmalign.training import TrainingStopped, checkpoint, train


def saved_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file under ``run`` (checkpoints and model), by path."""
    return {str(path): load_file(path) for path in sorted(run.rglob("*.safetensors"))}


def assert_all_finite(run: Path, limit: float) -> None:
    for path, tensors in saved_tensors(run).items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and "optimizer" not in path:
                assert torch.isfinite(tensor).all(), (path, name)
                assert float(tensor.abs().max()) <= limit, (path, name)


@pytest.mark.launches
def test_lr_1e308_exits_nonzero_and_saves_nothing_diverged(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards))
    status = fork_mmalign(
        ["train", str(config), "--set", "train.lr=1e308", "--set", "train.steps=2"]
    )
    assert status == 1
    assert not (run / "model").exists()
    assert checkpoint.list_checkpoints(run / "checkpoints") == []
    assert not (run / ".lock").exists()
    log = (run / "train.log").read_text()
    assert "training diverged at step 2" in log and "done:" not in log
    assert_all_finite(run, 1e4)


def test_following_the_printed_advice_finishes_a_healthy_run(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    # warmup 3: step 1 runs at lr 0 and is saved; step 2 (lr 3e307) diverges
    config = tiny_config(run, shards, train={"lr": 1e308, "warmup": 3, "save_every": 1})
    with pytest.raises(TrainingStopped) as stopped:
        train(config)
    message = str(stopped.value)
    assert "diverged at step 2" in message
    assert f"last good checkpoint is {run / 'checkpoints' / 'step-00000001'}" in message
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-00000001"]
    assert_all_finite(run, 1e4)

    advice = re.search(r"--resume --set (train\.lr=\S+)", message)
    assert advice is not None, message
    result = train(config, [advice.group(1)], resume=True)
    assert result.steps == 12 and result.nonfinite_steps == 0
    assert_all_finite(run, 1e4)
    model = AlignmentModel.from_pretrained(result.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(math.isfinite(r["train/loss"]) for r in records)


def test_a_diverged_weight_stops_before_the_next_checkpoint(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight beyond train.max_abs_weight (finite, but exploding) stops the run at that
    step: the checkpoint that step would have written is never written."""
    original = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: object) -> object:
        out = original(self, *args)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(1e6)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = tiny_config(tmp_path / "run", shards, train={"save_every": 2})
    with pytest.raises(TrainingStopped, match=r"diverged at step 4: 'towers\."):
        train(config)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000002"]
    assert_all_finite(tmp_path / "run", 1e4)


@pytest.fixture
def finished_run(tmp_path: Path, shards: str) -> Path:
    return train(tiny_config(tmp_path / "model-run", shards, train={"steps": 2})).output_dir


def test_export_refuses_a_model_with_a_nan_weight(
    tmp_path: Path, shards: str, finished_run: Path
) -> None:
    weights_file = finished_run / "model" / "model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(k for k in tensors if k.startswith("projections."))[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = math.nan
    save_file(tensors, weights_file)
    out = tmp_path / "emb"
    with pytest.raises(ExportError, match=rf"non-finite values in '{re.escape(name)}'"):
        run_export(str(finished_run), shards, None, out, chunk_size=8, progress=False)
    assert not (out / "manifest.json").exists()


def test_export_never_marks_a_nan_row_present(
    tmp_path: Path, shards: str, finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = AlignmentModel.forward

    def forward(self: AlignmentModel, *args: object, **kwargs: object) -> dict:
        out = original(self, *args, **kwargs)
        out["labs"] = out["labs"].clone()
        out["labs"][0] = math.nan  # the first row of every batch
        return out

    monkeypatch.setattr(AlignmentModel, "forward", forward)
    out = tmp_path / "emb"
    options = {"chunk_size": 8, "batch_size": 8, "dtype": "float32", "progress": False}
    manifest = run_export(str(finished_run), shards, None, out, **options)
    assert manifest["rows"] == 48
    assert manifest["counters"]["nonfinite_embeddings/labs"] == 6
    present = np.concatenate(
        [
            pq.read_table(out / c["files"]["meta"])["present_labs"].to_numpy()
            for c in manifest["chunks"]
        ]
    )
    vectors = np.concatenate([np.load(out / c["files"]["labs"]) for c in manifest["chunks"]])
    assert present.sum() == 42
    assert np.isfinite(vectors[present]).all() and np.isnan(vectors[~present]).all()


def test_constant_buffers_may_hold_infinities_but_running_statistics_may_not() -> None:
    """An attention mask's -inf (open_clip's text tower) is no divergence; a NaN running
    variance is."""
    from mmalign.training.health import unhealthy_tensor

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.register_buffer("attn_mask", torch.full((2, 2), float("-inf")).triu(1))
    assert unhealthy_tensor(model, max_abs=1e4) is None
    model[1].running_var[0] = float("nan")
    name, value = unhealthy_tensor(model, max_abs=1e4)
    assert name == "1.running_var" and math.isnan(value)
