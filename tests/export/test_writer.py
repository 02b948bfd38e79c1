"""Embedding export (chunks, resume after a crash or SIGKILL, ranks), FAISS index, search."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmalign.cli.export import add_arguments as add_export_arguments
from mmalign.cli.export import run as export_command
from mmalign.cli.search import add_arguments as add_search_arguments
from mmalign.cli.search import run as search_command
from mmalign.data.exports import ExportError, load_embeddings
from mmalign.errors import UserError
from mmalign.export import build_index, export_embeddings, load_index, search, writer
from tests.eval.test_zeroshot import TEXT, tabular, tiny_model, vectors, write_shards

FIELDS = {"x": "x.npy", "y": "y.npy", "text": "txt"}
ROWS = 23


def make_data(tmp_path: Path, rows: int = ROWS) -> tuple[list[str], dict[str, list]]:
    """Two shards; every 4th record lacks ``y``."""
    xs, ys = vectors(rows, 3, seed=10), vectors(rows, 3, seed=11)
    texts = [f"sample number {i}" for i in range(rows)]
    records = []
    for i in range(rows):
        record = {"__key__": f"k{i:04d}", "x.npy": xs[i], "txt": texts[i], "cls": i % 5}
        if i % 4 != 1:
            record["y.npy"] = ys[i]
        records.append(record)
    half = rows // 2
    shards = [
        write_shards(tmp_path / "data" / "d-000000.tar", records[:half]),
        write_shards(tmp_path / "data" / "d-000001.tar", records[half:]),
    ]
    return shards, {"x": xs, "y": ys, "text": texts}


@pytest.fixture
def model():
    return tiny_model("clip", {"x": tabular(3), "y": tabular(3), "text": TEXT})


def export_options(**overrides) -> dict:
    options = {
        "batch_size": 4,
        "chunk_size": 5,
        "dtype": "float32",
        "fields": FIELDS,
        "metadata_fields": ["cls", "txt"],
        "progress": False,
    }
    return options | overrides


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_exported_embeddings_equal_model_encode(tmp_path, model):
    shards, raw = make_data(tmp_path)
    manifest = export_embeddings(
        model, shards, ["x", "y", "text"], tmp_path / "out", **export_options()
    )
    assert manifest["complete"] and manifest["rows"] == ROWS
    assert [c["rows"] for c in manifest["chunks"]] == [5, 5, 5, 5, 3]
    assert (tmp_path / "out" / "x" / "chunk-000004.npy").is_file()
    for modality in ("x", "text"):
        vectors_, table = load_embeddings(tmp_path / "out", modality)
        expected = model.encode(modality, raw[modality]).numpy()
        np.testing.assert_allclose(vectors_, expected, atol=1e-6)
    vectors_, table = load_embeddings(tmp_path / "out", "y")
    has_y = np.array([i % 4 != 1 for i in range(ROWS)])
    assert table.column("present_y").to_pylist() == has_y.tolist()
    assert np.isnan(vectors_[~has_y]).all()
    expected = model.encode("y", [raw["y"][i] for i in np.flatnonzero(has_y)]).numpy()
    np.testing.assert_allclose(vectors_[has_y], expected, atol=1e-6)
    assert table.column("key").to_pylist() == [f"k{i:04d}" for i in range(ROWS)]
    assert table.column("cls").to_pylist() == [i % 5 for i in range(ROWS)]
    assert table.column("txt").to_pylist() == raw["text"]


def test_float16_export_rounds_the_float32_values(tmp_path, model):
    shards, raw = make_data(tmp_path)
    export_embeddings(model, shards, ["x"], tmp_path / "out", **export_options(dtype="float16"))
    vectors_, _ = load_embeddings(tmp_path / "out", "x")
    assert vectors_.dtype == np.float16
    expected = model.encode("x", raw["x"]).numpy().astype(np.float16)
    np.testing.assert_array_equal(vectors_, expected)


class Crash(RuntimeError):
    pass


def crash_on_call(monkeypatch, target: str, call: int, partial_temp: bool = False) -> None:
    """Make ``mmalign.export.writer.<target>`` raise on its ``call``-th call (1-based); with
    ``partial_temp`` leave a half-written temporary file behind, as a killed writer would."""
    original = getattr(writer, target)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if partial_temp:
                path = Path(args[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_name(f".{path.name}.tmp-r0").write_bytes(b"\x93NUMPY half")
            raise Crash(f"simulated crash in {target}")
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, target, wrapper)


@pytest.mark.parametrize(
    ("target", "call", "partial_temp", "done_chunks"),
    [
        ("_write_chunk", 3, False, 2),  # crash after 2 whole chunks
        # the chunk files (x, y, text, meta) go through writer.atomic_write, the manifest
        # through write_json: mid-chunk 2, x and y written, text half-written
        ("atomic_write", 11, True, 2),
    ],
)
def test_interrupted_export_resumes_to_identical_files(
    tmp_path, model, monkeypatch, target, call, partial_temp, done_chunks
):
    shards, _ = make_data(tmp_path)
    modalities = ["x", "y", "text"]
    export_embeddings(model, shards, modalities, tmp_path / "reference", **export_options())
    with monkeypatch.context() as patch:
        crash_on_call(patch, target, call, partial_temp)
        with pytest.raises(Crash):
            export_embeddings(model, shards, modalities, tmp_path / "resumed", **export_options())
    state = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not state["complete"] and len(state["chunks"]) == done_chunks
    embedded_rows = []
    hook = model.register_forward_hook(
        lambda module, args, output: embedded_rows.append(output["x"].shape[0])
    )
    export_embeddings(model, shards, modalities, tmp_path / "resumed", **export_options())
    hook.remove()
    # finished chunks are not recomputed: only batches from row 8 on (the one straddling
    # row 10, where chunk 2 starts, and the rest) go through the model
    assert sum(embedded_rows) == ROWS - 8
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "reference")


KILL_SCRIPT = """
import sys, time
from mmalign.eval.loading import load_model
from mmalign.export import export_embeddings
model = load_model(sys.argv[1])
model.register_forward_hook(lambda *args: time.sleep(0.15))
export_embeddings(sys.argv[1], sys.argv[2:4], ["x", "y", "text"], sys.argv[4], batch_size=4,
                  chunk_size=5, dtype="float32", fields={"x": "x.npy", "y": "y.npy",
                  "text": "txt"}, metadata_fields=["cls", "txt"], progress=False)
"""


@pytest.mark.launches
def test_export_killed_with_sigkill_resumes_to_identical_files(tmp_path, model):
    shards, _ = make_data(tmp_path, rows=60)
    saved = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(saved), *shards, str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.is_file() and len(json.loads(manifest.read_text())["chunks"]) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 2 <= len(state["chunks"]) < 12
    options = export_options()
    export_embeddings(saved, shards, ["x", "y", "text"], out, **options)
    export_embeddings(saved, shards, ["x", "y", "text"], tmp_path / "reference", **options)
    assert files_of(out) == files_of(tmp_path / "reference")


def test_resuming_with_other_settings_is_refused(tmp_path, model):
    shards, _ = make_data(tmp_path)
    export_embeddings(model, shards, ["x"], tmp_path / "out", **export_options())
    with pytest.raises(ExportError, match="chunk_size: 5 there, 6 now"):
        export_embeddings(model, shards, ["x"], tmp_path / "out", **export_options(chunk_size=6))


def test_ranks_write_their_own_chunks_and_the_manifest_merges_them(tmp_path, model):
    shards, _ = make_data(tmp_path)
    out = tmp_path / "out"
    first = export_embeddings(model, shards, ["x"], out, rank=0, world_size=2, **export_options())
    assert not (out / "manifest.json").exists()  # rank 1 has not finished yet
    assert all(chunk["name"].startswith("chunk-r0-") for chunk in first["chunks"])
    merged = export_embeddings(model, shards, ["x"], out, rank=1, world_size=2, **export_options())
    assert merged == json.loads((out / "manifest.json").read_text())
    assert merged["rows"] == ROWS
    names = [chunk["name"] for chunk in merged["chunks"]]
    assert names[0] == "chunk-r0-000000" and any(n.startswith("chunk-r1-") for n in names)
    _, table = load_embeddings(out, "x")
    keys = table.column("key").to_pylist()
    assert sorted(keys) == [f"k{i:04d}" for i in range(ROWS)]  # each record exactly once


def test_flat_and_full_probe_ivf_indexes_equal_brute_force(tmp_path):
    generator = np.random.default_rng(0)
    data = generator.normal(size=(400, 16)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    out = tmp_path / "out"
    settings = {"modalities": ["v"], "dim": 16}
    (out / "v").mkdir(parents=True)
    np.save(out / "v" / "chunk-000000.npy", data)
    (out / "meta").mkdir()
    table = {"key": [f"v{i}" for i in range(400)], "present_v": [True] * 400}
    pq.write_table(pa.table(table), out / "meta" / "chunk-000000.parquet")
    chunk = {
        "name": "chunk-000000",
        "rows": 400,
        "files": {"v": "v/chunk-000000.npy", "meta": "meta/chunk-000000.parquet"},
    }
    manifest = {"settings": settings, "complete": True, "chunks": [chunk], "rows": 400}
    (out / "manifest.json").write_text(json.dumps(manifest))
    queries = generator.normal(size=(20, 16)).astype(np.float32)
    brute = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10]
    for kind, options in (("flat", {}), ("ivf", {"nlist": 8, "nprobe": 8})):
        build_index(out, "v", kind, **options)
        results = load_index(out, "v").search(queries, k=10)
        found = [[int(row["key"][1:]) for row in rows] for rows in results]
        assert found == brute.tolist(), kind
        scores = [[row["score"] for row in rows] for rows in results]
        np.testing.assert_allclose(
            scores, np.take_along_axis(queries @ data.T, brute, 1), rtol=1e-5
        )
    build_index(out, "v", "hnsw", m=16, ef_search=128)
    hnsw = load_index(out, "v")
    assert hnsw.info["kind"] == "hnsw" and hnsw.index.hnsw.efSearch == 128
    found = [{row["key"] for row in rows} for rows in hnsw.search(queries, k=10)]
    recall = np.mean([len(f & {f"v{i}" for i in b}) / 10 for f, b in zip(found, brute)])
    assert recall >= 0.95


def test_search_encodes_the_query_and_returns_keys_and_metadata(tmp_path, model):
    shards, raw = make_data(tmp_path)
    saved = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    export_embeddings(saved, shards, ["x", "text"], out, **export_options())
    build_index(out, "x")
    build_index(out, "text")
    rows = search(out, None, raw["text"][7], "text", k=3, target="text")  # model from manifest
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert rows[0]["key"] == "k0007" and rows[0]["cls"] == 2 and rows[0]["txt"] == raw["text"][7]
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    embedded = model.encode("text", [raw["text"][7]]) @ model.encode("x", raw["x"]).T
    rows = search(out, model, raw["text"][7], "text", k=5, target="x")
    expected = torch.topk(embedded[0], 5)
    assert [row["key"] for row in rows] == [f"k{i:04d}" for i in expected.indices.tolist()]
    np.testing.assert_allclose([row["score"] for row in rows], expected.values.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="name the one to search"):
        search(out, model, "query", "text")


def test_cli_helpers_export_index_and_search(tmp_path, model, capsys):
    _, raw = make_data(tmp_path)
    saved = model.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "config.yaml").write_text(
        "model: {}\ndata:\n  fields: {x: x.npy, y: y.npy, text: txt}\n"
    )
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "emb"
    args = parser.parse_args(
        [
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--modalities",
            "x,text",
            "--metadata",
            "cls",
            "--index",
            "flat",
            "--no-progress",
        ]
    )
    assert export_command(args) == 0
    assert f"exported {ROWS} samples in 1 chunks" in capsys.readouterr().out
    # fields came from the run's config.yaml; the model path was recorded for search
    assert json.loads((out / "manifest.json").read_text())["settings"]["model_path"] == str(saved)
    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    args = parser.parse_args(
        [str(out), "--query", "x=" + json.dumps(raw["x"][3].tolist()), "--target", "x", "--k", "2"]
    )
    assert search_command(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "key", "present_x", "present_text", "cls"]
    rank, score, key = lines[1].split()[:3]
    assert (rank, key) == ("1", "k0003") and float(score) > 0.999  # float16 export
    assert len(lines) == 3
    # the same query at the Python level: an already parsed sample of a real modality
    rows = search(out, None, raw["x"][3].tolist(), "x", k=2, target="x")
    assert rows[0]["key"] == "k0003" and len(rows) == 2


def test_search_refuses_what_it_cannot_encode(tmp_path, model):
    shards, raw = make_data(tmp_path)
    out = tmp_path / "out"
    export_embeddings(model, shards, ["x"], out, **export_options())
    build_index(out, "x")
    with pytest.raises(ValueError, match="no modality 'tabular'"):
        search(out, model, raw["x"][0], "tabular")  # a tower type, not a modality
    with pytest.raises(ValueError, match="in-memory model"):
        search(out, None, raw["x"][0], "x")
    assert isinstance(ExportError("x"), UserError) and isinstance(ExportError("x"), RuntimeError)
