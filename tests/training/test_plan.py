"""Config semantics a user can predict: steps vs epochs, the printed plan, precision checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmalign.config import ConfigError, load_config
from mmalign.training import plan, train
from mmalign.training.checks import total_steps
from tests.train_support import tiny_config, write_shards


@pytest.fixture(scope="module")
def pattern(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), "train", shards=2, per_shard=8)


def _yaml(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_set_steps_replaces_the_files_epochs_and_runs_that_many(
    tmp_path: Path, pattern: str, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path / "run", pattern, train={"epochs": 40, "steps": None})
    config["data"]["epoch_samples"] = 64
    path = _yaml(tmp_path, config)
    assert total_steps(load_config(path)) == 40 * 64 // 8  # the file alone: epochs
    result = train(path, ["train.steps=3"])
    assert result.steps == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["epochs"]) == (3, None)
    printed = capsys.readouterr().out
    assert "  steps: 3 (train.steps)\n" in printed
    assert (
        "  global batch: 8 samples per step (8 per micro-batch x 1 accumulated x 1 processes); "
        "24 samples in all\n"
    ) in printed
    assert "  epoch: 64 samples (64 per process)\n" in printed
    assert "  precision: fp32 on cpu\n" in printed
    assert f"  logs: every 1 steps to {tmp_path / 'run' / 'train.log'} and " in printed


def test_set_epochs_replaces_the_files_steps(tmp_path: Path, pattern: str) -> None:
    config = tiny_config(tmp_path, pattern, train={"steps": 500, "accumulate": 2})
    config["data"]["epoch_samples"] = 40
    loaded = load_config(_yaml(tmp_path, config), ["train.epochs=3"])
    assert (loaded.train.steps, loaded.train.epochs) == (None, 3)
    assert total_steps(loaded) == 8  # ceil(3 x 40 / (8 x 2))
    text = plan.describe_plan(loaded, processes=2, device="cpu")
    assert "  steps: 8 (3 epochs of data.epoch_samples; train.epochs)" in text
    assert "  global batch: 32 samples per step" in text and "256 samples in all" in text
    assert "  data split: 2 shards over 2 readers (2 processes x 1 worker): 1 shard each" in text


def test_steps_and_epochs_together_in_one_source_are_an_error(tmp_path: Path, pattern: str) -> None:
    config = tiny_config(tmp_path, pattern, train={"steps": 10, "epochs": 2})
    with pytest.raises(ConfigError, match=r"train: steps \(10\) and epochs \(2\) are both set"):
        load_config(_yaml(tmp_path, config))
    config = tiny_config(tmp_path, pattern)
    with pytest.raises(ConfigError, match="are both set"):
        load_config(config, ["train.steps=4", "train.epochs=1"])


def test_a_precision_the_device_cannot_run_is_refused_before_anything_is_written(
    tmp_path: Path, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan, "_cpu_supports", lambda precision: False)
    config = tiny_config(tmp_path / "run", pattern, train={"precision": "bf16"})
    with pytest.raises(
        ConfigError, match=r"train.precision: bf16 is not supported natively on this cpu"
    ):
        train(config)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(plan, "_cpu_supports", lambda precision: precision == "bf16")
    plan.check_precision(load_config(config), "cpu")  # supported: no error
    with pytest.raises(ConfigError, match=r"train\.precision: fp16"):
        plan.check_precision(load_config(config, ["train.precision=fp16"]), "cpu")
    plan.check_precision(load_config(config, ["train.precision=fp32"]), "cpu")
