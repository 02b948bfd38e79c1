"""FAISS nearest-neighbour indexes over one modality of a finished export.

:func:`build_index` writes ``OUT/index/{modality}.faiss`` (inner product: cosine for
normalized embeddings) with ``{modality}.json`` (parameters) and ``{modality}.parquet`` (the
key and metadata of each indexed row, in index order); :func:`load_index` reads them back as
an :class:`EmbeddingIndex`.

Example:
    >>> build_index("emb", "image", kind="hnsw")  # doctest: +SKIP
    PosixPath('emb/index/image.faiss')
    >>> load_index("emb", "image").search(query_vectors, k=3)[0][0]["key"]  # doctest: +SKIP
    'test-000123'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmalign.export.reading import load_embeddings
from mmalign.files import atomic_write, read_json, write_json

INDEX_DIR = "index"
"""The folder of an export directory holding the indexes."""

IndexKind = Literal["flat", "ivf", "hnsw"]
"""``flat`` (exact), ``ivf`` (inverted lists) or ``hnsw`` (graph)."""


def _default_nlist(rows: int) -> int:
    """About 4 sqrt(N) lists, with at least 39 training points per list (FAISS's minimum)."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def _make_index(kind: IndexKind, vectors: np.ndarray, nlist: int | None, m: int) -> Any:
    dim = vectors.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        lists = nlist or _default_nlist(vectors.shape[0])
        if lists > vectors.shape[0]:
            raise ValueError(f"nlist={lists} exceeds the {vectors.shape[0]} vectors to index")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.train(vectors)
        return index
    raise ValueError(f"index kind must be 'flat', 'ivf' or 'hnsw', not {kind!r}")


def _set_search_parameters(index: Any, info: Mapping[str, Any]) -> None:
    if info["kind"] == "ivf":
        index.nprobe = min(info["nprobe"], info["nlist"])
    elif info["kind"] == "hnsw":
        index.hnsw.efSearch = info["ef_search"]


def _index_paths(out_dir: Path, modality: str) -> dict[str, Path]:
    base = out_dir / INDEX_DIR
    return {ext: base / f"{modality}.{ext}" for ext in ("faiss", "json", "parquet")}


def build_index(
    out_dir: str | Path,
    modality: str,
    kind: IndexKind = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 16,
    m: int = 32,
    ef_search: int = 64,
    ef_construction: int = 80,
) -> Path:
    """A FAISS inner-product index over one modality of a finished export.

    ``flat`` is exact; ``ivf`` (``nlist`` lists, default about 4 sqrt(N); ``nprobe`` searched)
    and ``hnsw`` (``m`` links per node, ``ef_search``/``ef_construction`` beam widths) are
    approximate. Rows where the modality is absent are left out. Writes
    ``OUT/index/{modality}.faiss``, ``.json`` (parameters) and ``.parquet`` (key and metadata
    per index row); returns the ``.faiss`` path.

    Example:
        >>> build_index("emb", "image", kind="ivf", nprobe=8)  # doctest: +SKIP
        PosixPath('emb/index/image.faiss')
    """
    out_dir = Path(out_dir)
    vectors, table = load_embeddings(out_dir, modality)
    keep = np.asarray(table.column(f"present_{modality}").to_pylist(), dtype=bool)
    vectors = np.ascontiguousarray(vectors[keep], dtype=np.float32)
    if vectors.shape[0] == 0:
        raise ValueError(f"{out_dir}: no exported sample has the {modality!r} modality")
    index = _make_index(kind, vectors, nlist, m)
    if kind == "hnsw":
        index.hnsw.efConstruction = ef_construction
    index.add(vectors)
    info = {
        "modality": modality,
        "kind": kind,
        "rows": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "nlist": int(index.nlist) if kind == "ivf" else None,
        "nprobe": nprobe,
        "m": m,
        "ef_search": ef_search,
        "ef_construction": ef_construction,
    }
    paths = _index_paths(out_dir, modality)
    rows = table.filter(pa.array(keep))
    atomic_write(paths["parquet"], lambda handle: pq.write_table(rows, handle))
    atomic_write(paths["faiss"], lambda handle: handle.write(faiss.serialize_index(index)))
    write_json(paths["json"], info)
    return paths["faiss"]


@dataclass
class EmbeddingIndex:
    """A loaded index: the FAISS index, its parameters, and the metadata row of each entry.

    Example:
        >>> index = load_index("emb", "image")  # doctest: +SKIP
        >>> index.info["kind"], index.info["rows"]  # doctest: +SKIP
        ('hnsw', 180)
    """

    index: Any
    info: dict[str, Any]
    table: pa.Table

    def search(self, vectors: np.ndarray | torch.Tensor, k: int = 10) -> list[list[dict[str, Any]]]:
        """The ``k`` nearest rows of each query vector: dicts with rank, key, score, metadata.

        Example:
            >>> load_index("emb", "image").search(query_vectors, k=5)[0][0]["key"]  # doctest: +SKIP
            'test-000042'
        """
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if queries.shape[1] != self.info["dim"]:
            raise ValueError(
                f"query vectors have dim {queries.shape[1]}; the index holds {self.info['dim']}"
            )
        scores, rows = self.index.search(queries, min(k, self.info["rows"]))
        results = []
        for query_scores, query_rows in zip(scores, rows):
            found = [(float(s), int(r)) for s, r in zip(query_scores, query_rows) if r >= 0]
            metadata = self.table.take([r for _, r in found]).to_pylist()
            results.append(
                [
                    {"rank": rank + 1, "score": score, **meta}
                    for rank, ((score, _), meta) in enumerate(zip(found, metadata))
                ]
            )
        return results


def indexed_modalities(out_dir: str | Path) -> list[str]:
    """Modalities with a built index in an export directory.

    Example:
        >>> indexed_modalities("emb")  # doctest: +SKIP
        ['image', 'text']
    """
    return sorted(path.stem for path in (Path(out_dir) / INDEX_DIR).glob("*.faiss"))


def load_index(out_dir: str | Path, modality: str | None = None) -> EmbeddingIndex:
    """Load the index of ``modality`` (default: the only one built) from an export directory.

    Example:
        >>> load_index("emb").info["kind"]  # doctest: +SKIP
        'hnsw'
    """
    out_dir = Path(out_dir)
    built = indexed_modalities(out_dir)
    if modality is None:
        if len(built) != 1:
            raise ValueError(
                f"{out_dir} has indexes for {built or 'no modality'}; name the one to search "
                "(or build one with build_index / mmalign export --index)"
            )
        modality = built[0]
    if modality not in built:
        raise FileNotFoundError(
            f"{out_dir} has no index for {modality!r} (built: {built}); run build_index first"
        )
    paths = _index_paths(out_dir, modality)
    info = read_json(paths["json"])
    index = faiss.deserialize_index(np.fromfile(paths["faiss"], dtype=np.uint8))
    _set_search_parameters(index, info)
    return EmbeddingIndex(index=index, info=info, table=pq.read_table(paths["parquet"]))
