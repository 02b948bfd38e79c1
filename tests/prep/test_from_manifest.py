"""mmalign prep from-manifest without --fields (types inferred from the values), --vector
and --val-fraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmalign.cli.main import main
from mmalign.data import iterate_records
from mmalign.prep import from_manifest
from tests.prep.test_prep import save_manifest, write_manifest_files


def test_manifest_without_fields_infers_types_and_skips_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = write_manifest_files(tmp_path)
    manifest = tmp_path / "manifest.csv"
    save_manifest(rows, manifest)
    out = tmp_path / "shards"
    assert main(["prep", "from-manifest", str(manifest), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fields_inferred"] is True
    assert summary["fields"] == {
        "image": "png",
        "text": "txt",
        "audio": "wav",
        "graph": "graph.json",
        "vec": "npy",
        "label": "cls",
    }
    assert summary["file_columns"] == ["audio", "image"]
    # the same rows are skipped for the same reasons as with --fields
    assert summary["records"] == 5
    assert summary["skipped"]["reasons"] == {
        "missing_file": 1,
        "unreadable_file/bad_image": 1,
        "bad_value/cls": 1,
        "duplicate_key": 1,
        "empty_row": 1,
    }
    printed = capsys.readouterr().out
    assert "fields inferred from the values: image=png (files), text=txt" in printed
    assert "left out 5 rows" in printed and "nowhere.png: no such file" in printed
    kept = {
        record["__key__"]
        for record in iterate_records([str(out / "data-000000.tar")], {"t": "txt"})
    }
    assert kept == {f"item{i}" for i in range(5)}


def test_inferred_file_column_of_text_files_never_stores_a_path_as_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the caption of a", encoding="utf-8")
    manifest = tmp_path / "m.jsonl"
    rows = [{"key": "a", "caption": "a.txt"}, {"key": "b", "caption": "b.txt"}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    summary = from_manifest.convert(manifest, tmp_path / "out")
    assert summary["fields"] == {"caption": "txt"} and summary["file_columns"] == ["caption"]
    assert summary["records"] == 1 and summary["skipped"]["reasons"] == {"missing_file": 1}
    records = list(iterate_records([str(tmp_path / "out" / "data-000000.tar")], {"t": "txt"}))
    assert [(r["__key__"], r["t"]) for r in records] == [("a", "the caption of a")]


def test_vector_columns_with_missing_values_and_a_hashed_val_split(tmp_path: Path) -> None:
    manifest = tmp_path / "table.csv"
    lines = ["key,age,glucose,note"] + [
        f"p{i},{40 + i},{'' if i % 3 else 5.5},n{i}" for i in range(40)
    ]
    lines += ["empty,,,x", "text,old,1,y"]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = from_manifest.convert(
        manifest, out, vectors={"labs.npy": ["age", "glucose"]}, val_fraction=0.25
    )
    assert summary["fields"] == {"note": "txt"}
    assert summary["skipped"]["reasons"] == {"bad_value/labs.npy": 1}
    assert summary["per_modality"] == {"note": 41, "labs.npy": 40}
    splits = {
        split: {
            r["__key__"]: r.get("v")
            for r in iterate_records(str(out / split), {"v": "labs.npy", "n": "txt"})
        }
        for split in ("train", "val")
    }
    assert summary["splits"] == {split: len(keys) for split, keys in splits.items()}
    assert summary["shards"] == ["train/data-000000.tar", "val/data-000000.tar"]
    assert 4 <= len(splits["val"]) <= 18 and not set(splits["val"]) & set(splits["train"])
    expected_val = {
        row
        for row in [*splits["train"], *splits["val"]]
        if from_manifest.split_of(row, 0.25) == "val"
    }
    assert set(splits["val"]) == expected_val
    values = {**splits["train"], **splits["val"]}
    assert values["empty"] is None
    np.testing.assert_array_equal(values["p3"], np.array([43.0, 5.5], dtype=np.float32))
    assert values["p4"][0] == 44.0 and np.isnan(values["p4"][1])
