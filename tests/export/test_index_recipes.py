"""Index kinds are a table: a kind added in this file alone (one recipe, one table line)
builds, saves, loads with its search parameters and searches; an unknown kind is refused
before anything is exported."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmalign.errors import ConfigError
from mmalign.export import build_index, load_index, run_export
from mmalign.export.index import INDEX_KINDS, IndexRecipe


def _export(out: Path, rows: int = 600, dim: int = 16) -> np.ndarray:
    """A finished export of one modality ``v`` (what export_embeddings writes)."""
    data = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    (out / "v").mkdir(parents=True)
    np.save(out / "v" / "chunk-000000.npy", data)
    (out / "meta").mkdir()
    table = {"key": [f"v{i}" for i in range(rows)], "present_v": [True] * rows}
    pq.write_table(pa.table(table), out / "meta" / "chunk-000000.parquet")
    files = {"v": "v/chunk-000000.npy", "meta": "meta/chunk-000000.parquet"}
    chunk = {"name": "chunk-000000", "rows": rows, "files": files}
    settings = {"modalities": ["v"], "dim": dim}
    manifest = {"settings": settings, "complete": True, "chunks": [chunk], "rows": rows}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return data


def _ivf_sq8(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    index = faiss.index_factory(vectors.shape[1], "IVF8,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return index


def _probe_all(index: Any, info: Mapping[str, Any]) -> None:
    faiss.extract_index_ivf(index).nprobe = info["nlist"]


def _lists(index: Any) -> dict[str, int]:
    return {"nlist": int(faiss.extract_index_ivf(index).nlist)}


def test_a_kind_added_by_one_table_line_builds_loads_and_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(INDEX_KINDS, "ivfsq8", IndexRecipe(_ivf_sq8, _probe_all, _lists))
    data = _export(tmp_path)
    build_index(tmp_path, "v", "ivfsq8")
    loaded = load_index(tmp_path, "v")
    assert (loaded.info["kind"], loaded.info["nlist"], loaded.info["rows"]) == ("ivfsq8", 8, 600)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 8  # the recipe's tune ran
    found = loaded.search(data[:20], k=1)
    assert [rows[0]["key"] for rows in found] == [f"v{i}" for i in range(20)]


def test_an_unknown_kind_is_refused_before_exporting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"index kind must be one of auto, flat, .*'lsh'"):
        run_export(tmp_path / "no-model", "no-shards", ["v"], tmp_path / "emb", index="lsh")
    assert not (tmp_path / "emb").exists()
