"""File-system errors other than a full disk during training end in one line naming the path
and what to do (status 2), chosen by errno: a read-only file system, a file beyond the
size limit, a full disk while converting. A write that fails naming no file (``write()``'s
``EFBIG``, ``ENOSPC``) names the file written, or else ``--out``; the advice names only flags
the command has. (A name too long and an ``--out`` that is a file
or the working directory: ``test_cli_validation.py``.)"""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
import yaml
from conftest import tiny_config, wait_forked, write_shards
from tiny_run import exported

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


def under_file_size_limit(arguments: list[str], limit: int = 256) -> tuple[int, str]:
    """``mmalign ARGUMENTS`` in a forked child under ``RLIMIT_FSIZE`` of ``limit`` bytes (a real
    ``EFBIG`` from ``write()``, which names no file); its exit status and stderr."""
    reader, writer = os.pipe()  # not a file: the limit would cut the child's stderr too
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            os.close(reader)
            sys.stderr = os.fdopen(writer, "w", buffering=1)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            status = main(arguments)
        finally:
            os._exit(status)
    os.close(writer)
    status = wait_forked(pid)
    with os.fdopen(reader) as pipe:
        return status, pipe.read()


@pytest.mark.launches
def test_real_file_size_limit_in_a_child_is_one_line(
    run_and_shards: tuple[str, str], tmp_path: Path
) -> None:
    """A forked export under ``RLIMIT_FSIZE`` of 256 bytes meets a real ``EFBIG``."""
    run, shards = run_and_shards
    out = tmp_path / "emb"
    arguments = ["--data", shards, "--out", str(out), "--dtype", "float32"]
    status, error = under_file_size_limit(["export", run, *arguments, "--no-progress"])
    assert status == 2
    assert error.count("\n") == 1 and error.startswith(f"mmalign: error: {out}/"), error
    assert "would grow beyond the largest file its file system allows" in error
    assert "a smaller --chunk-size" in error  # export has that flag
    assert not list(out.rglob(".*.tmp*")), "a temporary file was left"


@pytest.fixture(scope="module")
def export_dir(run_and_shards: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    run, shards = run_and_shards
    return str(exported(Path(run), shards, tmp_path_factory.mktemp("fs-export") / "emb"))


@pytest.mark.launches
@pytest.mark.parametrize("command", ["group-shards", "make-demo", "eval"])
def test_file_too_large_names_the_file_and_only_flags_the_command_has(
    run_and_shards: tuple[str, str], export_dir: str, tmp_path: Path, command: str
) -> None:
    """``EFBIG`` in ``eval``, ``prep group-shards`` and ``prep make-demo`` said "a file would
    grow ..." (which?) and advised ``--chunk-size``, a flag they lack. The file is named, the
    advice fits the command, and no cut shard or unfinished dataset is left."""
    run, shards = run_and_shards
    out = tmp_path / "out"
    arguments = {
        "group-shards": [
            "prep", "group-shards", "--embeddings", export_dir, "--modality", "labs",
            "--clusters", "2", "--out", str(out),
        ],
        "make-demo": ["prep", "make-demo", "--out", str(out), "--limit", "10", "--variants", "1"],
        "eval": ["eval", run, "--data", shards, "--out", str(out)],
    }[command]  # fmt: skip
    status, error = under_file_size_limit(arguments)
    assert status == 2
    assert error.count("\n") == 1 and error.startswith(f"mmalign: error: {out}/"), error
    written = error.removeprefix("mmalign: error: ").split(" would grow")[0]
    assert f"({written}); write to another file system (another --out)" in error
    assert "--chunk-size" not in error
    assert ("a smaller --maxcount" in error) == (command == "group-shards")
    left = [path for path in out.rglob("*") if path.is_file()] if out.exists() else []
    assert not [path for path in left if path.suffix == ".tar" or ".tmp" in path.name], left


def test_full_disk_in_a_shard_names_it_and_removes_the_cut_shards(
    export_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ENOSPC`` from a shard's ``write()`` (no file name) names the shard, says to free space
    on its disk or use another ``--out``, and the shards written so far are removed (a rerun
    would otherwise meet shards the tool did not finish)."""
    original = wds.ShardWriter.write
    calls = [0]

    def write(self: wds.ShardWriter, sample: dict[str, Any]) -> None:
        calls[0] += 1
        if calls[0] == 30:  # in the second shard of 24 records
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", write)
    out = tmp_path / "grouped"
    arguments = ["--modality", "labs", "--clusters", "2", "--maxcount", "24"]
    command = ["prep", "group-shards", "--embeddings", export_dir, *arguments]
    assert main([*command, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    shard = out / "data-000001.tar"
    assert error == (
        f"mmalign: error: {shard} cannot be written: no space left on its device ({shard}); "
        f"free space on the disk holding {shard} (another --out), and run the same command "
        "again\n"
    )
    assert not list(out.glob("*.tar")), "a cut shard was left"
    monkeypatch.undo()
    assert main([*command, "--out", str(out)]) == 0  # the same command again finishes
    assert sorted(path.name for path in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar"]


def test_write_error_naming_no_file_is_put_on_out(
    run_and_shards: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A write inside a library (``torch.onnx.export``) that fails naming no file is put on the
    command's ``--out``, with advice for it, and the staging folder is removed."""

    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("torch.onnx.export", full)
    out = tmp_path / "onnx"
    arguments = ["convert", run_and_shards[0], "--to", "onnx", "--modality", "labs"]
    assert main([*arguments, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"mmalign: error: a file in {out} cannot be written: no space left on its device "
        f"(--out); free space on the disk holding {out} (another --out), and run the same "
        "command again\n"
    )
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")), "a staging folder was left"


def test_folder_where_a_report_file_belongs_is_named_and_no_temporary_is_left(
    run_and_shards: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder ``eval.json`` in ``eval --out``: the error named the hidden temporary file
    (``.eval.json.tmp``) and left it there. It names ``eval.json`` and removes the temporary."""
    run, shards = run_and_shards
    out = tmp_path / "report"
    (out / "eval.json").mkdir(parents=True)
    assert main(["eval", run, "--data", shards, "--out", str(out), "--no-plots"]) == 2
    report = out / "eval.json"
    assert capsys.readouterr().err == (
        f"mmalign: error: {report} is a directory, not a file ({report}); remove it or write "
        "to another --out\n"
    )
    assert sorted(path.name for path in out.iterdir()) == ["eval.json"]


LIMIT = 6000
"""Bytes a file may hold in the child: the run's config, logs and metrics fit, the tiny
model's checkpoint weights do not."""


@pytest.mark.launches
def test_a_checkpoint_beyond_the_file_size_limit_is_one_line(
    run_and_shards: tuple[str, str], tmp_path: Path
) -> None:
    """A checkpoint's safetensors write under ``RLIMIT_FSIZE`` raised safetensors' own
    ``SafetensorError`` (``I/O error: File too large (os error 27)``): a traceback, status 1.
    It is the file-system error it quotes, naming the file."""
    _, shards = run_and_shards
    config = tmp_path / "config.yaml"
    settings = tiny_config(tmp_path / "run", shards, train={"steps": 2, "save_every": 1})
    config.write_text(yaml.safe_dump(settings))
    status, output = under_file_size_limit(["train", str(config)], limit=LIMIT)
    assert status == 2 and "Traceback" not in output, output
    error = output.splitlines()[-1]  # after the run's progress lines
    assert ".safetensors would grow beyond the largest file its file system allows" in error
    assert error.startswith(f"mmalign: error: {tmp_path / 'run' / 'checkpoints'}/"), error
