"""One bad label or metadata value never ends an evaluation or an export: a ``cls`` beyond
int64 is a counted skip (``skipped/bad_label``) and a JSON value Arrow cannot hold becomes a
string cell; the other records are all used."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import good_record, write_shard
from tiny_run import exported, trained_run

from mmalign.cli.main import main
from mmalign.data.exports import load_embeddings

HUGE = 99999999999999999999  # over int64: torch and Arrow cannot hold it


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny run, and a shard of 24 records whose 6th has a huge label and whose 9th a
    JSON file with a huge number."""
    directory = tmp_path_factory.mktemp("metadata")
    run, _ = trained_run(directory)
    records = [good_record(i) for i in range(24)]
    records[5]["cls"] = str(HUGE).encode()
    for i, record in enumerate(records):
        record["json"] = json.dumps({"id": HUGE if i == 8 else i}).encode()
    return run, str(write_shard(directory / "bad" / "bad-000000.tar", records))


def test_export_counts_a_huge_label_and_keeps_huge_json_as_text(
    tmp_path: Path, setup: tuple[Path, str]
) -> None:
    run, shard = setup
    out = exported(run, shard, tmp_path / "emb", metadata_fields=["cls", "json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 23 and manifest["counters"]["skipped/bad_label"] == 1
    _, table = load_embeddings(out, "labs")
    assert "sample00005" not in table.column("key").to_pylist()
    assert sorted(table.column("cls").to_pylist()) == sorted(i % 3 for i in range(24) if i != 5)
    cells = table.column("json").to_pylist()
    assert json.loads(cells[7]) == {"id": HUGE}  # row 8 (row 5 is gone): a string cell
    schema = pq.read_schema(out / manifest["chunks"][0]["files"]["meta"])
    assert schema.field("json").type == "string"


def test_eval_linear_probe_skips_a_huge_label(
    tmp_path: Path, setup: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    run, shard = setup
    arguments = ["eval", str(run), "--data", shard, "--out", str(tmp_path / "eval")]
    arguments += ["--linear-probe", "--probe-train", shard, "--probe-modality", "labs"]
    arguments += ["--no-plots"]
    assert main(arguments) == 0, capsys.readouterr().err
    probe = json.loads((tmp_path / "eval" / "probe.json").read_text())["linear"]
    assert probe["fit_samples"] == probe["test_samples"] == 23  # 24 records, one skipped
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["samples"] == 23
