"""The prep tools that read an export's source records again (``group-shards``,
``mine-negatives``): an export made without ``--field`` records the extensions it read, and a
source shard changed since the export is refused naming it, never an empty output."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import good_record, write_shard
from tiny_run import exported, trained_run

from mmalign.cli.main import main


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("stale")
    run, shards = trained_run(directory)
    return exported(run, shards, directory / "emb"), shards


def mine(export_dir: Path, out: Path) -> list[str]:
    return [
        "prep", "mine-negatives", "--embeddings", str(export_dir), "--query", "labs",
        "--candidates", "graph", "--k", "2", "--out", str(out),
    ]  # fmt: skip


def test_mine_negatives_reads_an_export_made_without_field(
    tmp_path: Path, export: tuple[Path, str]
) -> None:
    export_dir, _ = export
    settings = json.loads((export_dir / "manifest.json").read_text())["settings"]
    assert settings["fields"] is None  # exported without --field
    assert settings["extensions"] == {"labs": "npy", "graph": "graph.json"}
    assert main(mine(export_dir, tmp_path / "mined")) == 0
    with tarfile.open(tmp_path / "mined" / "data-000000.tar") as tar:
        names = tar.getnames()
    assert len([n for n in names if n.endswith(".negatives.json")]) == 48
    summary = json.loads((tmp_path / "mined" / "summary.json").read_text())
    negatives = [n for n in names if ".neg" in n and n.endswith(".graph.json")]
    assert summary["records"] == 48 and len(negatives) == summary["negatives"] > 48


def test_changed_source_shard_is_refused_naming_it(
    tmp_path: Path, export: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    export_dir, pattern = export
    shard = Path(pattern.split("{")[0] + "000001.tar")
    original, stamp = shard.read_bytes(), os.stat(shard)
    try:
        write_shard(shard, [good_record(1000 + i) for i in range(16)])  # other keys
        commands = {
            "group-shards": [
                "prep", "group-shards", "--embeddings", str(export_dir), "--modality",
                "labs", "--clusters", "2", "--out", str(tmp_path / "grouped"),
            ],
            "mine-negatives": mine(export_dir, tmp_path / "mined"),
        }  # fmt: skip
        for name, command in commands.items():
            assert main(command) == 2, name
            error = capsys.readouterr().err.strip()
            assert error.startswith(f"mmalign: error: the source shard {shard} changed"), error
            assert "export the shards again" in error and len(error.splitlines()) == 1
        assert not (tmp_path / "grouped").exists() and not (tmp_path / "mined").exists()
        # an export that did not record its shards: the missing keys are found instead
        manifest = json.loads((export_dir / "manifest.json").read_text())
        saved = json.dumps(manifest)
        del manifest["settings"]["source_shards"]
        (export_dir / "manifest.json").write_text(json.dumps(manifest))
        assert main(commands["group-shards"]) == 2
        error = capsys.readouterr().err.strip()
        assert "16 of the 48 exported records (first: 'sample000" in error, error
        (export_dir / "manifest.json").write_text(saved)
    finally:
        shard.write_bytes(original)
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def group(export_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prep", "group-shards", "--embeddings", str(export_dir), "--modality", "labs",
        "--clusters", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def test_prep_never_replaces_its_source_shards_or_shards_it_did_not_write(
    tmp_path: Path, export: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` at the source shards' folder with ``--name train`` removed two of the three
    source shards and overwrote the third (exit 0); a folder holding a user's
    ``data-000000.tar`` lost it. Both are refused; an earlier output of a prep tool is
    replaced."""
    export_dir, pattern = export
    source = Path(pattern.split("{")[0] + "000000.tar").parent
    before = {path.name: path.read_bytes() for path in source.glob("*.tar")}
    for command in (
        group(export_dir, source, "--name", "train"),
        [*mine(export_dir, source), "--name", "train"],
    ):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert "holds the input" in error and "train-000000.tar of prep" in error, error
        assert error.count("\n") == 1
    assert {path.name: path.read_bytes() for path in source.glob("*.tar")} == before
    mine_dir = tmp_path / "mine"
    mine_dir.mkdir()
    (mine_dir / "data-000000.tar").write_bytes(b"my own shard")
    assert main(group(export_dir, mine_dir)) == 2
    error = capsys.readouterr().err
    assert "holds files that prep group-shards did not write (data-000000.tar) (--out)" in error
    assert (mine_dir / "data-000000.tar").read_bytes() == b"my own shard"
    out = tmp_path / "grouped"
    assert main(group(export_dir, out, "--maxcount", "5")) == 0
    assert len(list(out.glob("data-*.tar"))) == 10
    assert main(group(export_dir, out, "--maxcount", "24")) == 0  # its own output: replaced
    assert sorted(path.name for path in out.glob("data-*.tar")) == [
        "data-000000.tar",
        "data-000001.tar",
    ]


def test_same_size_rewrite_with_the_old_time_is_refused(
    tmp_path: Path, export: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard rewritten with the same size and its modification time put back (``touch
    -r``) passed the size and time check; the export's content digest finds it. An export
    made before digests were recorded is still checked by size and time, with a warning."""
    export_dir, pattern = export
    shard = Path(pattern.split("{")[0] + "000002.tar")
    original, stamp = shard.read_bytes(), os.stat(shard)
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[0].offset_data
    changed = bytearray(original)
    changed[offset] ^= 1  # one payload byte: the tar stays valid, same size
    manifest_path = export_dir / "manifest.json"
    saved = manifest_path.read_text()
    try:
        shard.write_bytes(bytes(changed))
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert (os.stat(shard).st_size, os.stat(shard).st_mtime_ns) == (
            stamp.st_size,
            stamp.st_mtime_ns,
        )
        for command in (group(export_dir, tmp_path / "g"), mine(export_dir, tmp_path / "m")):
            assert main(command) == 2
            error = capsys.readouterr().err
            assert error.startswith(f"mmalign: error: the source shard {shard} changed"), error
            assert error.count("\n") == 1
        manifest = json.loads(saved)  # as an export made before digests records its shards
        for path, recorded in manifest["settings"]["source_shards"].items():
            manifest["settings"]["source_shards"][path] = recorded[:2]
        manifest_path.write_text(json.dumps(manifest))
        with pytest.warns(UserWarning, match="records no content digest of its source shards"):
            assert main(group(export_dir, tmp_path / "g")) == 0
    finally:
        manifest_path.write_text(saved)
        shard.write_bytes(original)
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_touched_shard_with_the_same_content_is_read(
    tmp_path: Path, export: tuple[Path, str]
) -> None:
    """Only a shard's time changed (copied without ``-p``): its content digest is the one
    recorded, so the prep tools read it."""
    export_dir, pattern = export
    shard = Path(pattern.split("{")[0] + "000000.tar")
    stamp = os.stat(shard)
    try:
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
        assert main(group(export_dir, tmp_path / "g")) == 0
    finally:
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
