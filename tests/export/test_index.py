"""Index kinds: compact ``ivfpq`` and ``sq8`` next to ``flat``; the default kind by size;
the size on disk; truncation composes with every kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmalign.export import build_index, load_index
from mmalign.export.index import default_kind

ROWS, DIM = 3000, 32


def _clustered(rows: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 30 centres (real embeddings cluster; uniform noise does not)."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(30, dim))
    data = centres[generator.integers(0, 30, rows)] + 0.3 * generator.normal(size=(rows, dim))
    return (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)


def _write_export(out: Path, data: np.ndarray) -> Path:
    """A finished export of one modality ``v`` (what export_embeddings writes)."""
    (out / "v").mkdir(parents=True)
    np.save(out / "v" / "chunk-000000.npy", data)
    (out / "meta").mkdir()
    table = {"key": [f"v{i}" for i in range(len(data))], "present_v": [True] * len(data)}
    pq.write_table(pa.table(table), out / "meta" / "chunk-000000.parquet")
    files = {"v": "v/chunk-000000.npy", "meta": "meta/chunk-000000.parquet"}
    chunk = {"name": "chunk-000000", "rows": len(data), "files": files}
    settings = {"modalities": ["v"], "dim": data.shape[1], "matryoshka": [8, 16, 32]}
    manifest = {"settings": settings, "complete": True, "chunks": [chunk], "rows": len(data)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, np.ndarray]:
    data = _clustered(ROWS, DIM, seed=0)
    return _write_export(tmp_path_factory.mktemp("idx") / "out", data), data


def _found(out: Path, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    return [[int(r["key"][1:]) for r in rows] for rows in load_index(out, "v").search(queries, k)]


def _recall(found: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_compact_kinds_are_small_and_close_to_exact(export) -> None:
    out, data = export
    queries = _clustered(50, DIM, seed=1)
    exact = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10]
    sizes = {}
    for kind, options in [("flat", {}), ("sq8", {}), ("ivfpq", {"nlist": 16, "nprobe": 16})]:
        path = build_index(out, "v", kind, **options)
        info = load_index(out, "v").info
        assert info["kind"] == kind and info["bytes"] == path.stat().st_size
        assert info["bytes_per_vector"] == pytest.approx(path.stat().st_size / ROWS)
        sizes[kind] = info["bytes_per_vector"]
        found = _found(out, queries)
        assert _recall(found, exact) >= {"flat": 1.0, "sq8": 0.95, "ivfpq": 0.35}[kind], kind
    info = load_index(out, "v").info
    assert (info["pq_m"], info["pq_bits"]) == (8, 6)  # dim/4 codes; log2(3000/39) = 6 bits
    assert 4 * DIM <= sizes["flat"] < 4 * DIM + 1  # float32 vectors
    assert sizes["sq8"] < sizes["flat"] / 3  # one byte per coordinate
    assert sizes["ivfpq"] < sizes["flat"] / 5  # 8 code bytes + an 8-byte id per vector


def test_sq8_scores_are_within_the_quantization_step(export) -> None:
    out, data = export
    build_index(out, "v", "sq8")
    queries = data[:20]
    rows = load_index(out, "v").search(queries, k=5)
    for query, found in zip(queries, rows):
        assert found[0]["key"] in {f"v{i}" for i in np.flatnonzero(data @ query > 0.999)}
        for row in found:
            exact = float(data[int(row["key"][1:])] @ query)
            assert row["score"] == pytest.approx(exact, abs=0.02)


def test_ivfpq_scores_are_inner_products_with_the_decoded_vectors(export) -> None:
    """Asymmetric distance: the exact query against each stored vector as PQ decodes it."""
    out, data = export
    build_index(out, "v", "ivfpq", nlist=16, nprobe=16)
    loaded = load_index(out, "v")
    loaded.index.make_direct_map()
    queries = data[:10]
    for query, found in zip(queries, loaded.search(queries, k=10)):
        for row in found:
            decoded = loaded.index.reconstruct(int(row["key"][1:]))
            assert row["score"] == pytest.approx(float(decoded @ query), abs=1e-4)
    # with every list probed, the search is exact over the decoded vectors
    decoded_all = loaded.index.reconstruct_n(0, ROWS)
    top = np.argsort(-(queries @ decoded_all.T), axis=1, kind="stable")[:, :10]
    found = _found(out, queries)
    assert _recall(found, top) >= 0.98


def test_default_kind_follows_the_number_of_vectors(export) -> None:
    assert [default_kind(n) for n in (10, 19_999, 20_000, 999_999, 1_000_000)] == [
        "flat",
        "flat",
        "hnsw",
        "hnsw",
        "ivfpq",
    ]
    out, _ = export
    build_index(out, "v")
    assert load_index(out, "v").info["kind"] == "flat"  # 3000 vectors
    build_index(out, "v", "auto")
    assert load_index(out, "v").info["kind"] == "flat"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "sq8"])
def test_truncation_composes_with_every_kind(export, kind) -> None:
    out, data = export
    build_index(out, "v", kind, dim=16, nlist=16, nprobe=16, m=16, ef_search=128)
    loaded = load_index(out, "v")
    assert loaded.info["dim"] == 16
    prefix = data[:, :16] / np.linalg.norm(data[:, :16], axis=1, keepdims=True)
    queries = prefix[:30]
    if kind == "ivfpq":  # lossy codes: exact over what it stores (the decoded prefixes)
        loaded.index.make_direct_map()
        prefix = loaded.index.reconstruct_n(0, ROWS)
    exact = np.argsort(-(queries @ prefix.T), axis=1, kind="stable")[:, :10]
    assert _recall(_found(out, queries), exact) >= (0.9 if kind == "sq8" else 0.95)
    with pytest.raises(ValueError, match="index holds 16"):
        loaded.search(data[:1], k=3)


def test_bad_index_options_are_refused(export) -> None:
    out, _ = export
    with pytest.raises(ValueError, match="pq_m=5 sub-quantizers must divide the dim 32"):
        build_index(out, "v", "ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="index kind must be one of"):
        build_index(out, "v", "lsh")
