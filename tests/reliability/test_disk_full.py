"""A full disk (ENOSPC) while training or exporting is one error line that says what was
kept and how to continue, not a traceback; continuing after that finishes the work."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_same_tensors, final_weights, tiny_config, write_config

import mmalign.export.writer as writer
import mmalign.training.checkpoint as checkpoint_module
from mmalign.cli.main import main
from mmalign.export import run_export
from mmalign.training import train


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> None:
    """``owner.name`` raises ENOSPC on its ``call``-th call, as ``write`` does on a full disk."""
    original, count = getattr(owner, name), [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == call:
            target = next(str(a) for a in args if isinstance(a, str | Path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_full_disk_while_training_is_one_line_and_resume_finishes(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    expected = final_weights(train(tiny_config(tmp_path / "reference", shards)).output_dir)
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards))
    with monkeypatch.context() as patch:
        fail_on_call(patch, checkpoint_module, "save_file", 3)  # 2 per checkpoint: the second
        assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mmalign: error: no space left on the device of ")
    assert f"the newest complete checkpoint is {run / 'checkpoints' / 'step-00000003'}" in error
    assert "continue with --resume" in error
    assert not (run / ".lock").exists()
    train(config, resume=True)
    assert_same_tensors(final_weights(run), expected)


def test_full_disk_while_exporting_is_one_line_and_rerun_finishes(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = train(tiny_config(tmp_path / "model", shards, train={"steps": 2})).output_dir
    options = {"chunk_size": 8, "dtype": "float32", "progress": False}
    out = tmp_path / "emb"
    with monkeypatch.context() as patch:
        fail_on_call(patch, writer, "atomic_write", 7)  # 3 files per chunk: chunk 3
        with pytest.raises(writer.ExportError, match=r"no space left .*npy\); the 2 chunks listed"):
            run_export(str(model), shards, None, out, **options)
    assert not (out / ".lock").exists()
    manifest = run_export(str(model), shards, None, out, **options)
    reference = run_export(str(model), shards, None, tmp_path / "reference", **options)
    assert manifest["rows"] == reference["rows"] == 48
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / "reference" / f).read_bytes() for f in files)
