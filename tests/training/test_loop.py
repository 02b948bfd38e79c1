"""The training loop end to end on tiny tabular shards: artifacts, resume, locks, NaN steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmalign.files import LockError
from mmalign.model import AlignmentModel
from mmalign.objectives import LossOutput
from mmalign.training import TrainingStopped, train
from mmalign.training.trainer import Trainer
from tests.train_support import metrics, model_weights, tiny_config, write_shards


def _tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` in the run directory's TensorBoard event files."""
    events = EventAccumulator(str(run))
    events.Reload()
    return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("shards")
    return {
        "train": write_shards(directory, "train", shards=2, per_shard=32, seed=0, missing=0.2),
        "val": write_shards(directory, "val", shards=1, per_shard=24, seed=1),
    }


def test_run_directory_holds_config_logs_plots_and_loadable_model(
    tmp_path: Path, shards: dict[str, str]
) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        out,
        shards["train"],
        shards["val"],
        data={"resampled": True, "shuffle_buffer": 16},
        train={"steps": 24, "accumulate": 2, "log_every": 4, "tensorboard": True, "plots": True},
        eval={"every": 12, "best_metric": "val/instance/R@1/mean", "best_mode": "max"},
    )
    result = train(config)

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 24 and saved["eval"]["every"] == 12
    assert saved["train"]["find_unused_parameters"] is True  # defaults are resolved
    assert json.loads((out / "run.json").read_text())["world_size"] == 1
    records = metrics(out)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16, 20, 24]
    assert losses[-1] < 0.8 * losses[0]  # it learns
    validations = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in validations] == [12, 24]
    assert {
        "val/instance/R@1/x->y",
        "val/instance/R@5/y->x",
        "val/instance/R@1/mean",
    } <= validations[-1].keys()
    assert validations[-1]["val/instance/R@5/x->y"] > 5 / 24  # better than chance on 24 pairs
    last_train = [r for r in records if "train/loss" in r][-1]
    assert last_train["data/used"] >= 24 * 2 * 8  # loader counters are logged
    assert _tensorboard_scalars(out, "train/loss") == [
        (r["step"], r["train/loss"]) for r in records if "train/loss" in r
    ]
    assert [step for step, _ in _tensorboard_scalars(out, "val/instance/R@1/mean")] == [12, 24]
    assert {"loss.png", "temperature.png", "validation.png"} <= set(os.listdir(out))
    assert result.metrics == {k: v for k, v in validations[-1].items() if k != "step"}

    model = AlignmentModel.from_pretrained(result.model_dir)
    final = load_file(out / "checkpoints" / "step-00000024" / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name
    best_step = max(validations, key=lambda r: r["val/instance/R@1/mean"])["step"]
    best = json.loads((out / "checkpoints" / "best" / "trainer.json").read_text())
    assert best["step"] == best_step and result.best_metric == best["best"]["value"]
    assert not (out / ".lock").exists()


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    original = Trainer._after_step

    def after_step(self: Trainer) -> None:
        original(self)
        if self.step == stop_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", after_step)


def test_resume_continues_exactly(
    tmp_path: Path, shards: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = {
        "model": {
            "towers": {
                "x": {"type": "tabular", "in_features": 4, "hidden": 16, "dropout": 0.3},
                "y": {"type": "tabular", "in_features": 4, "hidden": 16},
            }
        },
        "data": {"resampled": False, "shuffle_buffer": 8},  # epochs of 64 samples: 4 steps
        "train": {"steps": 10, "accumulate": 2, "warmup": 2, "save_every": 3, "keep_last": 2},
    }
    straight = train(tiny_config(tmp_path / "straight", shards["train"], **sections))

    interrupted = tmp_path / "interrupted"
    _interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(interrupted, shards["train"], **sections))
    monkeypatch.undo()
    checkpoints = sorted(os.listdir(interrupted / "checkpoints"))
    assert checkpoints == ["step-00000003", "step-00000006"]
    (interrupted / ".lock").write_text(f"{socket.gethostname()} 999999\n")  # a dead process

    resumed = train(tiny_config(interrupted, shards["train"], **sections), resume=True)

    assert resumed.steps == straight.steps == 10
    expected, actual = model_weights(straight.output_dir), model_weights(interrupted)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-6, atol=1e-7, msg=name)
    losses = {r["step"]: r["train/loss"] for r in metrics(interrupted) if "train/loss" in r}
    assert sorted(losses) == list(range(1, 11))  # records after the checkpoint were rewritten
    reference = {
        r["step"]: r["train/loss"] for r in metrics(straight.output_dir) if "train/loss" in r
    }
    assert losses == pytest.approx(reference, rel=1e-5)
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["step-00000009", "step-00000010"]


@pytest.mark.launches
def test_busy_or_finished_run_directory_is_refused(tmp_path: Path, shards: dict[str, str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        with pytest.raises(LockError, match=f"PID {sleeper.pid}"):
            train(tiny_config(out, shards["train"], train={"steps": 2}))
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / ".lock").unlink()
    train(tiny_config(out, shards["train"], train={"steps": 2}))
    with pytest.raises(LockError, match="--resume"):
        train(tiny_config(out, shards["train"], train={"steps": 2}))
    finished = train(tiny_config(out, shards["train"], train={"steps": 2}), resume=True)
    assert finished.steps == 2


def _nan_loss_on(monkeypatch: pytest.MonkeyPatch, calls: set[int] | None) -> list[int]:
    """Make the model's loss NaN on the given call numbers (``None``: from the 4th on)."""
    original = AlignmentModel.loss
    seen: list[int] = []

    def loss(self: AlignmentModel, *args, **kwargs) -> LossOutput:
        output = original(self, *args, **kwargs)
        seen.append(len(seen) + 1)
        bad = seen[-1] >= 4 if calls is None else seen[-1] in calls
        return LossOutput(output.loss * float("nan"), output.metrics) if bad else output

    monkeypatch.setattr(AlignmentModel, "loss", loss)
    return seen


def test_nonfinite_loss_skips_the_step(
    tmp_path: Path, shards: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_loss_on(monkeypatch, {2, 3})
    result = train(
        tiny_config(tmp_path / "run", shards["train"], train={"steps": 4, "max_nonfinite": 3})
    )
    assert result.steps == 4 and result.nonfinite_steps == 2
    records = metrics(tmp_path / "run")
    assert records[-1]["train/nonfinite_skipped"] == 2
    assert all(r["train/loss"] == r["train/loss"] for r in records)  # no NaN was logged
    assert (
        "non-finite loss nan; step skipped (2 in a row"
        in (tmp_path / "run" / "train.log").read_text()
    )


def test_nonfinite_losses_in_a_row_stop_the_run_keeping_the_checkpoint(
    tmp_path: Path, shards: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_loss_on(monkeypatch, None)
    out = tmp_path / "run"
    config = tiny_config(
        out, shards["train"], train={"steps": 8, "save_every": 3, "max_nonfinite": 3}
    )
    with pytest.raises(
        TrainingStopped, match=r"3 non-finite losses/gradients in a row.*step-00000003"
    ):
        train(config)
    assert os.listdir(out / "checkpoints") == ["step-00000003"]
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["step"] == 3
    weights = load_file(out / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert not (out / "model").exists() and not (out / ".lock").exists()


def test_skipped_records_are_counted_in_the_log(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "data", "train", shards=1, per_shard=16)
    with wds.TarWriter(str(tmp_path / "data" / "bad-000000.tar")) as writer:
        for index in range(3):
            writer.write({"__key__": f"bad{index}", "x.npy": b"not an array", "y.npy": b"nor this"})
    shards = [str(tmp_path / "data" / "bad-000000.tar"), pattern]  # bad records come first
    out = tmp_path / "run"
    train(tiny_config(out, shards, train={"steps": 2}))
    last = metrics(out)[-1]
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped/")}
    assert sum(skipped.values()) >= 3, last
    assert "records skipped so far" in (out / "train.log").read_text()


def test_mmalign_train_is_the_training_function(tmp_path: Path, shards: dict[str, str]) -> None:
    import mmalign

    assert callable(mmalign.train) and mmalign.train.__module__ == "mmalign.training.run"
    result = mmalign.train(tiny_config(tmp_path / "run", shards["train"], train={"steps": 1}))
    assert result.steps == 1 and (tmp_path / "run" / "model" / "config.json").is_file()
