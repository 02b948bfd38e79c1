"""SIGKILL during ``mmalign export``: no partial chunk ever counts as complete, and the
restarted export ends with files byte-identical to an uninterrupted export."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import EXPORT_CHUNK, export_arguments, fork_mmalign, tiny_config

from mmalign.data.exports import ExportError, load_embeddings, read_manifest
from mmalign.export import run_export
from mmalign.training import train

pytestmark = pytest.mark.launches

CHUNK = EXPORT_CHUNK
WRITER = "mmalign.export.writer"
"""The module whose functions the kill points wrap."""


def export_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_listed_chunks_complete(out: Path, expected: dict[str, bytes]) -> int:
    """Every chunk the progress manifest lists has all its files, identical to the reference;
    the export does not read as finished. Returns the number of listed chunks."""
    with pytest.raises(ExportError, match="no finished export"):
        read_manifest(out)
    with pytest.raises(ExportError):
        load_embeddings(out, "labs")
    state = (
        json.loads((out / "manifest.json").read_text())
        if (out / "manifest.json").exists()
        else {"chunks": [], "complete": False}
    )
    assert not state["complete"]
    for chunk in state["chunks"]:
        for relative in chunk["files"].values():
            assert (out / relative).read_bytes() == expected[relative], relative
    return len(state["chunks"])


@pytest.fixture
def trained_run(tmp_path: Path, shards: str) -> Path:
    return train(tiny_config(tmp_path / "run", shards, train={"steps": 3})).output_dir


def test_killed_export_resumes_to_identical_files(
    tmp_path: Path, shards: str, trained_run: Path
) -> None:
    reference_dir = tmp_path / "reference"
    reference = run_export(
        str(trained_run),
        shards,
        None,
        reference_dir,
        chunk_size=CHUNK,
        dtype="float32",
        metadata_fields=["cls"],
        progress=False,
    )
    assert reference["rows"] == 48 and len(reference["chunks"]) == 6
    expected = export_files(reference_dir)

    out = tmp_path / "killed"
    arguments = export_arguments(trained_run, shards, out)
    # 1: chunk 3's files are in place but the manifest does not list it yet
    assert fork_mmalign(arguments, [f"{WRITER}:_write_chunk:3:after"]) == -signal.SIGKILL
    assert (out / "labs" / "chunk-000002.npy").is_file()
    assert assert_listed_chunks_complete(out, expected) == 2
    # 2: resumed, killed with a half-written temporary file of chunk 5's metadata
    assert fork_mmalign(arguments, [f"{WRITER}:pq.write_table:3:before"]) == -signal.SIGKILL
    assert list(out.glob("meta/.chunk-000004.parquet.tmp*")), "the kill missed the write"
    assert not (out / "meta" / "chunk-000004.parquet").exists()
    assert assert_listed_chunks_complete(out, expected) == 4

    assert fork_mmalign(arguments) == 0
    assert export_files(out) == expected
    assert read_manifest(out)["counters"] == reference["counters"]
