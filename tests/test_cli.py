"""The ``mmalign`` command line: train with overrides, clean errors, prep forwarding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_train_support import tiny_config, write_shards

import mmalign.demo.data
from mmalign.cli.main import main


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    pattern = write_shards(directory / "data", "train", shards=1, per_shard=16)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(directory / "unused", pattern)))
    return path


def test_train_runs_with_set_overrides(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    status = main(
        ["train", str(config_file), "--set", "train.steps=3", "--set", f"train.output={out}"]
    )
    assert status == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["output"] == str(out)
    assert json.loads((out / "run.json").read_text())["total_steps"] == 3
    assert (out / "model" / "model.safetensors").is_file()
    assert f"trained 3 steps on 1 process(es); model: {out / 'model'}" in capsys.readouterr().out


def test_errors_are_one_message_with_a_status(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    status = main(["train", str(config_file), "--set", "data.batch_size=lots"])
    assert status == 2
    assert "data.batch_size: Input should be a valid integer" in capsys.readouterr().err
    out = tmp_path / "run"
    assert (
        main(["train", str(config_file), "--set", "train.steps=1", "--set", f"train.output={out}"])
        == 0
    )
    assert (
        main(["train", str(config_file), "--set", "train.steps=1", "--set", f"train.output={out}"])
        == 2
    )
    assert "pass --resume" in capsys.readouterr().err


def test_prep_forwards_arguments_to_the_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(mmalign.demo.data, "make_demo", lambda out, **kw: calls.append((out, kw)))
    assert main(["prep", "make-demo", "--out", str(tmp_path), "--limit", "10"]) == 0
    assert calls == [(tmp_path, {"seed": 0, "variants": 4, "limit": 10, "force": False})]
    with pytest.raises(SystemExit) as exited:
        main(["prep", "no-such-tool"])
    assert exited.value.code == 2
