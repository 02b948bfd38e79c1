"""No file of a run or export directory is written through a symbolic link: a link inside one
(``train.log``, ``metrics.jsonl``, a ``step-*``, ``index/``) is refused with one line naming
it, and the file or folder it points to is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from tiny_run import exported, trained_run

from mmalign.cli.main import main
from mmalign.export import build_index
from mmalign.files import LinkError, atomic_write, open_append


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    directory = tmp_path_factory.mktemp("links")
    run, shards = trained_run(directory)
    return run, shards, exported(run, shards, directory / "emb")


def test_links_in_a_run_directory_are_refused(
    tmp_path: Path, made: tuple[Path, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, shards, _ = made
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not append here")
    (outside / "step-00000001").mkdir()
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": 2}))
    assert main(["train", str(config)]) == 0
    before = snapshot(outside)
    for name, target in (
        ("train.log", outside / "secret.txt"),
        ("metrics.jsonl", outside / "secret.txt"),
        ("checkpoints/step-00000001", outside / "step-00000001"),
    ):
        link = run / name
        saved = tmp_path / "saved"
        os.replace(link, saved) if link.exists() else None
        link.symlink_to(target)
        capsys.readouterr()
        status = main(["train", str(config), "--resume", "--set", "train.steps=4"])
        error = capsys.readouterr().err.strip()
        assert status == 2, name
        assert error == (
            f"mmalign: error: {link} is a symbolic link (to {target}) inside the run directory "
            "(train.output); mmalign writes no file through a link there: replace it with a "
            "regular file or folder, or remove it"
        )
        link.unlink()
        os.replace(saved, link) if saved.exists() else None
        assert not (run / ".lock").exists()
    assert snapshot(outside) == before
    assert main(["train", str(config), "--resume", "--set", "train.steps=4"]) == 0


def test_links_in_an_export_directory_are_refused(
    tmp_path: Path, made: tuple[Path, str, Path]
) -> None:
    run, shards, _ = made
    outside = tmp_path / "outside"
    outside.mkdir()
    out = exported(run, shards, tmp_path / "emb")
    (out / "index").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LinkError, match=r"index is a symbolic link .* inside the export"):
        build_index(out, "labs", "flat")
    with pytest.raises(LinkError, match=r"index is a symbolic link"):
        exported(run, shards, out)  # the same export again
    assert list(outside.iterdir()) == []
    (out / "index").unlink()
    assert build_index(out, "labs", "flat").is_file()


def test_files_are_never_opened_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched")
    (tmp_path / "train.log").symlink_to(target)
    with pytest.raises(LinkError, match=r"train\.log is a symbolic link"):
        open_append(tmp_path / "train.log")
    (tmp_path / ".model.json.tmp").symlink_to(target)  # a link under a temporary name
    atomic_write(tmp_path / "model.json", lambda handle: handle.write(b"{}"))
    assert target.read_text() == "untouched" and (tmp_path / "model.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("command", "planted"),
    [
        (["eval", "RUN", "--data", "SHARDS", "--out", "OUT", "--no-plots"], "eval.json"),
        (
            [
                "prep",
                "group-shards",
                "--embeddings",
                "EMB",
                "--modality",
                "labs",
                "--clusters",
                "2",
                "--out",
                "OUT",
            ],
            "summary.json",
        ),
        (
            ["prep", "curate", "RUN", "--data", "SHARDS", "--no-dedup", "--out", "OUT"],
            "curate.json",
        ),
    ],
    ids=["eval report", "group-shards summary", "curate report"],
)
def test_links_in_report_and_prep_outputs_are_refused(
    tmp_path: Path,
    made: tuple[Path, str, Path],
    command: list[str],
    planted: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A report or summary linked to a file outside was overwritten through the link (exit
    0) by ``eval --out``, ``prep group-shards`` and ``prep curate``."""
    run, shards, emb = made
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(outside)
    names = {"RUN": str(run), "SHARDS": shards, "EMB": str(emb), "OUT": str(out)}
    assert main([names.get(word, word) for word in command]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{out / planted} is a symbolic link" in error
    assert outside.read_text() == "not yours" and sorted(os.listdir(out)) == [planted]
