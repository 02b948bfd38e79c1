"""``mmalign convert --out``: a new or empty folder, or a previous output of the same
converter, is written; anything else there (a folder of the user's files, the run being
converted, a file, another converter's output) is refused with one line and left as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from tiny_run import trained_run

from mmalign.cli.main import main
from mmalign.output_owner import RECORD


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return trained_run(tmp_path_factory.mktemp("convert"))


@pytest.fixture(scope="module")
def run(run_and_shards: tuple[Path, str]) -> Path:
    return run_and_shards[0]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (what must survive a refusal)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def convert(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(
            ["convert", str(run), "--to", "onnx", "--modality", "labs", "--out", str(out)]
        )
    except SystemExit as exit:  # refused by the --out argument type, before convert runs
        status = int(exit.code or 0)
    return status, capsys.readouterr().err.strip()


def test_convert_refuses_what_it_did_not_write(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "papers"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    before = {path: tree(path) for path in (users, run)}
    for out, says in (
        (users, "holds files that convert --to onnx did not write (thesis.tex) (--out)"),
        (run, f"{run} is the input {run} of convert --to onnx (--out)"),  # the source itself
        (run / "model", "lies inside the input"),
        (run / "onnx", "lies inside the input"),
        (run.parent, "holds the input"),
        (a_file, "is a file, not a directory"),
    ):
        status, error = convert(run, out, capsys)
        assert status == 2, out
        assert error.startswith("mmalign: error: ") and says in error, error
        assert len(error.splitlines()) == 1
    assert {path: tree(path) for path in (users, run)} == before
    assert a_file.read_text() == "keep me" and not list(tmp_path.glob(".old-*"))


def test_convert_writes_new_or_empty_folders_and_replaces_its_own_output(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(run, empty, capsys)[0] == 0
    assert (empty / "labs.onnx").is_file()
    first = (empty / "labs.onnx").stat().st_ino
    assert convert(run, empty, capsys)[0] == 0  # a previous onnx output: replaced
    assert (empty / "labs.onnx").stat().st_ino != first
    written = (empty / "labs.onnx").read_bytes()
    (empty / "labs.onnx").write_bytes(b"edited")  # changed since: the user's now
    status, error = convert(run, empty, capsys)
    assert status == 2 and "holds labs.onnx, changed since convert --to onnx wrote it" in error
    (empty / "labs.onnx").write_bytes(written)
    status = main(["convert", str(run), "--to", "hf", "--out", str(empty)])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "holds the output of convert --to onnx, not of convert --to hf" in error
    assert (empty / "labs.onnx").is_file()
    (empty / "notes.txt").write_text("mine")  # a file the user added to the output
    before = tree(empty)
    status, error = convert(run, empty, capsys)
    assert status == 2 and error.endswith(
        f"{empty} holds notes.txt, which convert --to onnx did not write (--out); move it out "
        "of the folder, or pick a new or empty folder"
    )
    assert tree(empty) == before  # nothing deleted
    (empty / "notes.txt").unlink()
    assert convert(run, empty, capsys)[0] == 0


def test_a_copied_record_is_no_provenance(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The outside re-run copied convert's marker into the run (then ``convert run --out run``
    deleted the run, exit 0) and into a folder of the user's files (replaced, exit 0). A
    record describes the files it lists: any other file there, or one of another size, is
    refused; the source is refused whatever it holds."""
    out = tmp_path / "onnx"
    assert convert(run, out, capsys)[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    users = tmp_path / "papers"
    users.mkdir()
    (users / "onnx.json").write_text("my own notes, named as convert names its file")
    for folder in (copy, users):
        shutil.copy(out / RECORD, folder / RECORD)
    shutil.copy(out / RECORD, copy / ".mmalign-convert.json")  # the old marker's name too
    before = {path: tree(path) for path in (copy, users)}
    status, error = convert(copy, copy, capsys)
    assert status == 2 and f"{copy} is the input {copy} of convert" in error, error
    status, error = convert(run, copy, capsys)
    assert status == 2 and ", which convert --to onnx did not write (--out)" in error, error
    status, error = convert(run, users, capsys)
    assert status == 2 and f"{users} holds onnx.json, changed since convert" in error, error
    assert {path: tree(path) for path in (copy, users)} == before


@pytest.mark.launches
def test_convert_refuses_out_before_it_loads_torch(run: Path, tmp_path: Path) -> None:
    """A bad ``--out`` was refused after about 5 s (torch and the model loaded first)."""
    users = tmp_path / "papers"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    code = (
        "import sys\n"
        "from mmalign.cli.main import main\n"
        f"status = main(['convert', {str(run)!r}, '--to', 'onnx', '--out', {str(users)!r}])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "did not write (thesis.tex) (--out)" in done.stderr


def test_train_tokenizer_replaces_only_an_earlier_tokenizer(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prep train-tokenizer --out RUN/config.yaml`` replaced the run's config with a
    SentencePiece model (exit 0), and a failed training left an empty file. A file that is not
    a tokenizer, or a folder, is refused and left as it was; a failure keeps the old model."""
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(f'{{"t": "a digit {i} seven three"}}\n' for i in range(200)))
    arguments = ["prep", "train-tokenizer", "--manifest", str(manifest), "--field", "t"]
    before = tree(run)
    for out in (run / "config.yaml", run):
        assert main([*arguments, "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "is not a SentencePiece model (--out)" in error
    assert tree(run) == before
    model = tmp_path / "spm.model"
    assert main([*arguments, "--out", str(model), "--vocab-size", "40"]) == 0
    first = model.read_bytes()
    assert main([*arguments, "--out", str(model), "--vocab-size", "30"]) == 0  # replaced
    second = model.read_bytes()
    assert second != first
    manifest.write_text('{"t": ""}\n')  # no sentence: SentencePiece fails
    assert main([*arguments, "--out", str(model)]) == 2  # the one-line error (--field)
    assert model.read_bytes() == second and sorted(tmp_path.iterdir()) == [model, manifest]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (
            {"manifest.json": '{"mine": 1}'},
            "manifest.json is not the manifest of an mmalign export",
        ),
        ({"manifest.json": "[1, 2]"}, "manifest.json is not the manifest of an mmalign export"),
        ({"notes.txt": "mine"}, "holds files an export did not write (notes.txt) (--out)"),
        ({}, "holds files an export did not write (checkpoints, config.yaml"),  # the run
    ],
    ids=["foreign manifest", "manifest list", "user folder", "run directory"],
)
def test_export_refuses_a_folder_it_did_not_write(
    run_and_shards: tuple[Path, str],
    tmp_path: Path,
    content: dict[str, str],
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``export --out`` at a folder with someone else's ``manifest.json`` ended in a
    KeyError/TypeError traceback; at a folder of the user's files or at the run itself it
    wrote the export among them (replacing any file of the same name)."""
    run, shards = run_and_shards
    out = tmp_path / "out" if content else run
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(out)
    assert main(["export", str(run), "--data", shards, "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "(--out)" in error, error
    assert tree(out) == before
