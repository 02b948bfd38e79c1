"""Two training runs or two exports pointed at one output directory: the second refuses with
a clear message and the first finishes uncorrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    assert_same_tensors,
    final_weights,
    start_forked,
    tiny_config,
    wait_for_file,
    wait_forked,
    write_config,
)

from mmalign.cli.main import main
from mmalign.export import run_export
from mmalign.files import LockError
from mmalign.training import train

pytestmark = pytest.mark.launches


def test_second_training_run_on_a_busy_directory_refuses(
    tmp_path: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = final_weights(train(tiny_config(tmp_path / "reference", shards)).output_dir)
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    config_path = write_config(tmp_path / "run.yaml", tiny_config(run, shards))
    first = start_forked(
        ["train", str(config_path)],
        ["mmalign.training.trainer:Trainer._train_step:5:pause"],
        faults,
    )
    try:
        wait_for_file(faults / "paused", first)
        with pytest.raises(LockError, match=f"used by another training run \\(PID {first}"):
            train(config_path, resume=True)
        with pytest.raises(LockError, match="already holds a training run"):
            train(config_path)
        assert main(["train", str(config_path), "--resume"]) == 2
        assert "another training run" in capsys.readouterr().err
    finally:
        (faults / "release").touch()
        status = wait_forked(first)
    assert status == 0
    assert_same_tensors(final_weights(run), expected)
    assert not (run / ".lock").exists(), "the finished run must release its lock"


def test_second_export_into_a_busy_directory_refuses(
    tmp_path: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = train(tiny_config(tmp_path / "run", shards, train={"steps": 2})).output_dir
    options = {"chunk_size": 8, "dtype": "float32", "progress": False}
    reference = run_export(str(trained), shards, None, tmp_path / "reference", **options)
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    arguments = [
        "export",
        str(trained),
        "--data",
        shards,
        "--out",
        str(out),
        "--chunk-size",
        "8",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    first = start_forked(arguments, ["mmalign.export.writer:_write_chunk:3:pause"], faults)
    try:
        wait_for_file(faults / "paused", first)
        with pytest.raises(LockError, match=f"used by another export \\(PID {first}"):
            run_export(str(trained), shards, None, out, **options)
        with pytest.raises(LockError, match="export into another directory"):
            run_export(str(trained), shards, None, out, **{**options, "chunk_size": 4})
        assert main(arguments) == 2
        assert f"used by another export (PID {first}" in capsys.readouterr().err
    finally:
        (faults / "release").touch()
        status = wait_forked(first)
    assert status == 0
    finished = run_export(str(trained), shards, None, out, **options)
    assert finished["chunks"] == reference["chunks"] and finished["complete"]
    for chunk in reference["chunks"]:
        for relative in chunk["files"].values():
            assert (out / relative).read_bytes() == (tmp_path / "reference" / relative).read_bytes()
