"""File-system errors other than a full disk during training end in one line naming the path
and what to do (status 2), chosen by errno: a read-only file system, a file beyond the
size limit, a full disk while converting. (A name too long and an ``--out`` that is a file
or the working directory: ``test_cli_validation.py``.)"""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config, wait_forked, write_shards

from mmalign.cli.main import main
from mmalign.training import train


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("fs")
    shards = write_shards(root / "shards")
    return str(train(tiny_config(root / "run", shards, train={"steps": 2})).output_dir), shards


def refuse(number: int) -> Any:
    def write(path: Path, *_: Any, **__: Any) -> None:
        raise OSError(number, os.strerror(number), str(path))

    return write


@pytest.mark.parametrize(
    ("number", "message"),
    [
        (errno.EROFS, "is on a read-only file system"),
        (errno.EFBIG, "would grow beyond the largest file its file system allows"),
        (errno.ENAMETOOLONG, "has a name too long for its file system"),
        (errno.EACCES, "cannot be opened: permission denied"),
    ],
    ids=["read-only", "file too large", "name too long", "permission"],
)
def test_export_file_system_error_is_one_line_naming_the_file(
    run_and_shards: tuple[str, str],
    tmp_path: Path,
    number: int,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, shards = run_and_shards
    monkeypatch.setattr("mmalign.export.writer.atomic_write", refuse(number))
    out = tmp_path / "emb"
    assert main(["export", run, "--data", shards, "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"mmalign: error: {out}/"), error
    assert message in error


def test_disk_full_while_converting_is_one_line(
    run_and_shards: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("mmalign.convert.common.replace_directory", refuse(errno.ENOSPC))
    out = tmp_path / "onnx"
    arguments = ["convert", run_and_shards[0], "--to", "onnx", "--modality", "labs"]
    assert main([*arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no space left on its device" in error, error
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")), "a staging folder was left"


@pytest.mark.launches
def test_real_file_size_limit_in_a_child_is_one_line(
    run_and_shards: tuple[str, str], tmp_path: Path
) -> None:
    """A forked export under ``RLIMIT_FSIZE`` of 256 bytes meets a real ``EFBIG``."""
    run, shards = run_and_shards
    out = tmp_path / "emb"
    reader, writer = os.pipe()  # not a file: the limit would cut the child's stderr too
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            os.close(reader)
            sys.stderr = os.fdopen(writer, "w", buffering=1)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
            arguments = ["--data", shards, "--out", str(out), "--dtype", "float32"]
            status = main(["export", run, *arguments, "--no-progress"])
        finally:
            os._exit(status)
    os.close(writer)
    assert wait_forked(pid) == 2
    with os.fdopen(reader) as pipe:
        error = pipe.read()
    assert error.count("\n") == 1 and error.startswith(f"mmalign: error: {out}/"), error
    assert "would grow beyond the largest file its file system allows" in error
    assert not list(out.rglob(".*.tmp*")), "a temporary file was left"
