"""The weight average (train.ema): a float64 recurrence over the steps, validation and the
final model use it, a resumed run continues it exactly; constant buffers (open_clip's causal
mask) are copied, and a failing last validation never loses the trained model."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate import Accelerator
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.trainer import Trainer
from mmalign.training.validation import Validator
from tests.train_support import model_weights, tiny_config, write_shards
from tests.training.test_loop import _interrupt_after

DECAY = 0.8
SECTIONS = {
    "model": {
        "towers": {
            "x": {"type": "tabular", "in_features": 4, "hidden": 16, "dropout": 0.3},
            "y": {"type": "tabular", "in_features": 4, "hidden": 16},
        }
    },
    "data": {"resampled": False, "shuffle_buffer": 8},
    "train": {"steps": 6, "ema": DECAY, "warmup": 2, "save_every": 3, "keep_last": 2},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), "train", shards=2, per_shard=32)


def test_average_follows_the_float64_recurrence(tmp_path: Path, shards: str) -> None:
    config = load_config(tiny_config(tmp_path / "run", shards, **SECTIONS))
    trainer = Trainer(config, Accelerator(cpu=True), resume=False)
    weights: list[dict[str, torch.Tensor]] = []  # after each optimizer step

    def record(*_: object) -> None:
        weights.append(
            {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}
        )

    trainer.optimizer.optimizer.register_step_post_hook(record)
    with trainer.logs():
        trainer.run()

    assert len(weights) == 6
    average = dict(weights[0])  # torch's AveragedModel: the first update copies
    for step in weights[1:]:
        average = {n: DECAY * average[n] + (1 - DECAY) * step[n] for n in average}
    ema = dict(trainer.ema.module.named_parameters())
    for name, value in average.items():
        torch.testing.assert_close(ema[name].double(), value, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(ema["projections.x.weight"], trainer.model.projections.x.weight)
    assert trainer.final_model is trainer.ema.module  # what validation reads and run.py saves
    assert int(trainer.ema.n_averaged) == 6


def test_resumed_average_equals_uninterrupted_and_is_the_final_model(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train(tiny_config(tmp_path / "straight", shards, **SECTIONS))

    interrupted = tmp_path / "interrupted"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(interrupted, shards, **SECTIONS))
    monkeypatch.undo()
    assert os.listdir(interrupted / "checkpoints") == ["step-00000003"]
    (interrupted / ".lock").write_text(f"{socket.gethostname()} 999999\n")  # a dead process
    train(tiny_config(interrupted, shards, **SECTIONS), resume=True)

    last = "checkpoints/step-00000006"
    expected_ema = load_file(straight.output_dir / last / "ema.safetensors")
    resumed_ema = load_file(interrupted / last / "ema.safetensors")
    assert expected_ema.keys() == resumed_ema.keys()
    for name, value in expected_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-6, atol=1e-7, msg=name)
    final, raw = model_weights(interrupted), load_file(interrupted / last / "model.safetensors")
    assert final.keys() == raw.keys()
    for name, value in final.items():  # the saved model is the average, not the last weights
        assert torch.equal(value, resumed_ema[f"module.{name}"]), name
    assert not torch.equal(final["projections.x.weight"], raw["projections.x.weight"])


TEXT = {"type": "text", "width": 16, "heads": 2, "layers": 1, "context_length": 8}


def write_text_shards(directory: Path, name: str, records: int) -> str:
    """One shard of ``records`` records with a tabular vector and a caption naming its
    largest coordinate."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    with wds.TarWriter(str(directory / f"{name}-000000.tar")) as writer:
        for index in range(records):
            x = rng.normal(size=4).astype(np.float32)
            caption = f"the largest is number {int(np.argmax(x))}"
            writer.write({"__key__": f"{name}{index:04d}", "x.npy": x, "txt": caption})
    return str(directory / f"{name}-000000.tar")


def text_tower_config(tmp_path: Path) -> dict:
    train_shards = write_text_shards(tmp_path / "data", "train", 32)
    val_shards = write_text_shards(tmp_path / "data", "val", 16)
    return tiny_config(
        tmp_path / "run",
        train_shards,
        val_shards,
        model={"towers": {"x": {"type": "tabular", "in_features": 4, "hidden": 16}, "t": TEXT}},
        data={"fields": {"x": "x.npy", "t": "txt"}},
        train={"steps": 4, "ema": 0.9, "warmup": 1},
        eval={"every": 2},
    )


def test_ema_of_an_open_clip_text_tower_copies_its_mask_validates_and_saves(
    tmp_path: Path,
) -> None:
    """open_clip's causal mask (a buffer of -inf) is copied into the average, not averaged
    into NaN: validation runs and the trained average is saved with finite weights."""
    result = train(text_tower_config(tmp_path))
    assert result.steps == 4 and "val/loss" in result.metrics
    assert all(math.isfinite(value) for value in result.metrics.values())
    saved = AlignmentModel.from_pretrained(result.output_dir / "model")
    mask = dict(saved.named_buffers())["towers.t.encoder.module.attn_mask"]
    assert torch.equal(mask, torch.full((8, 8), float("-inf")).triu(1))
    for name, value in model_weights(result.output_dir).items():
        assert bool(torch.isfinite(value).all()), name


def test_a_failing_last_validation_keeps_the_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(self: Validator, *args: object) -> dict:
        calls.append(1)
        if len(calls) == 2:  # step 2 validates; the last one (step 4) fails
            raise RuntimeError("linalg.svd: the algorithm failed to converge")
        return {"val/loss": 1.0}

    monkeypatch.setattr(Validator, "__call__", failing)
    config = text_tower_config(tmp_path)
    with pytest.raises(RuntimeError, match="svd"):
        train(config)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000004").is_dir()
    trained = AlignmentModel.from_pretrained(run / "model")
    ema = load_file(run / "checkpoints" / "step-00000004" / "ema.safetensors")
    for name, value in trained.state_dict().items():
        assert torch.equal(value, ema[f"module.{name}"]), name
