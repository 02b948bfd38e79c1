"""Record keys that are paths out of a folder (``../../x``, ``/abs/x``) are never written back
as tar member names by ``prep group-shards``, ``prep mine-negatives`` or ``prep curate``: such
a record is skipped and logged with its shard, key and reason; the others are written.
``prep from-manifest`` applies the same rule (``unsafe_key``) to the keys it writes."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest
from conftest import good_record, tiny_config, write_shard

from mmalign.export import export_embeddings
from mmalign.export.curate import curate
from mmalign.prep.from_manifest import convert
from mmalign.prep.group_shards import group_shards
from mmalign.prep.mine_negatives import mine_negatives
from mmalign.training import train

HOSTILE = ["../../escaped", "/tmp/absolute", "ok/../../up"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    records = [good_record(index) for index in range(16)]
    for record, key in zip(records, HOSTILE, strict=False):
        record["__key__"] = key
    records[5]["__key__"] = "folder/sample00005"  # a folder in a key is fine
    shard = str(write_shard(root / "shards" / "train-000000.tar", records))
    run = train(tiny_config(root / "run", shard, train={"steps": 2})).output_dir
    out = root / "emb"
    fields = {"labs": "npy", "graph": "graph.json"}
    export_embeddings(str(run), shard, ["labs", "graph"], out, fields=fields, progress=False)
    return out


def member_names(out: Path) -> list[str]:
    names = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            names += archive.getnames()
    return names


def check_written(out: Path) -> None:
    names = member_names(out)
    assert names, "nothing was written"
    assert not [name for name in names if name.startswith("/") or ".." in name.split("/")]
    assert any(name.startswith("folder/sample00005.") for name in names)


def check_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Each skip is logged once per process (shard, key, reason): by the first test."""
    logged = [record.getMessage() for record in caplog.records]
    for key in HOSTILE:
        assert any(repr(key) in line and "(unsafe_key)" in line for line in logged), key


def test_group_shards_skips_hostile_keys(
    export_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    summary = group_shards(export_dir, "labs", 2, tmp_path / "grouped")
    assert summary["records"] == 16 - len(HOSTILE)
    check_written(tmp_path / "grouped")
    check_logged(caplog)


def test_mine_negatives_skips_hostile_keys(export_dir: Path, tmp_path: Path) -> None:
    summary = mine_negatives(export_dir, "labs", "graph", 2, 1.0, tmp_path / "mined")
    check_written(tmp_path / "mined")
    assert summary["records"] == 16 - len(HOSTILE)
    assert not [name for name in member_names(tmp_path / "mined") if "escaped" in name]


def test_curate_skips_hostile_keys(export_dir: Path, tmp_path: Path) -> None:
    """``prep curate`` copied ``../../escaped`` and ``/tmp/absolute`` into its shards as
    member names; they are counted as ``unsafe_key`` and left out."""
    shard = str(export_dir.parent / "shards" / "train-000000.tar")
    report = curate(export_dir.parent / "run", shard, tmp_path / "curated", dedup=None)
    check_written(tmp_path / "curated")
    assert report["dropped"]["unsafe_key"] == len(HOSTILE)
    assert report["kept"] == 16 - len(HOSTILE)


def test_from_manifest_refuses_the_keys_the_other_tools_refuse(tmp_path: Path) -> None:
    """``prep from-manifest`` wrote a key with a backslash, which ``prep group-shards`` then
    refused as ``unsafe_key``: every writer of record keys now shares one rule."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("key,value\nok1,1\nba\\ck,2\n../../x,3\n/etc/passwd,4\nok2,5\n")
    summary = convert(manifest, tmp_path / "out", vectors={"npy": ["value"]})
    assert summary["records"] == 2 and summary["skipped"]["reasons"] == {"bad_key": 3}
    errors = [example["error"] for example in summary["skipped"]["examples"]]
    assert errors[0] == "key 'ba\\\\ck' is empty or holds a NUL or a backslash"
    names = member_names(tmp_path / "out")
    assert sorted(names) == ["ok1.npy", "ok2.npy"]
