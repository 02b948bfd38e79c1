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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmalign.data.exports import load_embeddings, read_manifest
from mmalign.embeddings import check_prefix, truncate
from mmalign.errors import ConfigError
from mmalign.extras import missing_extra
from mmalign.files import atomic_write, read_json, refuse_links, write_json
from mmalign.progress import progress_bar


def _faiss() -> Any:
    """The faiss module (the ``[index]`` extra), imported when an index is built or read, so
    that exporting embeddings needs no FAISS."""
    try:
        import faiss
    except ImportError:
        raise missing_extra(
            "index", "FAISS indexes (mmalign export --index, mmalign search)"
        ) from None
    return faiss


INDEX_DIR = "index"
"""The folder of an export directory holding the indexes."""

FLAT_BELOW = 20_000
"""Default rule: an exact ``flat`` index below this many vectors, ..."""
HNSW_BELOW = 1_000_000
"""... ``hnsw`` below this many, ``ivfpq`` from there on (memory: PQ codes, not floats)."""


def default_kind(rows: int) -> str:
    """The kind :func:`build_index` picks for ``rows`` vectors: ``flat`` below 20,000 (an
    exact scan still answers in about a millisecond), ``hnsw`` below 1,000,000, else
    ``ivfpq`` (a graph over a million float vectors no longer fits memory comfortably).

    Example:
        >>> default_kind(5_000), default_kind(100_000), default_kind(5_000_000)
        ('flat', 'hnsw', 'ivfpq')
    """
    return "flat" if rows < FLAT_BELOW else "hnsw" if rows < HNSW_BELOW else "ivfpq"


def _default_nlist(rows: int) -> int:
    """About 4 sqrt(N) lists, with at least 39 training points per list (FAISS's minimum)."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def _default_pq(dim: int, rows: int) -> tuple[int, int]:
    """Sub-quantizers (the largest divisor of ``dim`` up to ``dim / 4``: 16x smaller than
    float32 vectors) and bits per code (8, fewer when there are under 39 x 256 vectors)."""
    subquantizers = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    bits = max(1, min(8, int(math.log2(max(rows, 2) / 39))))
    return subquantizers, bits


def _inverted_lists(vectors: np.ndarray, nlist: int | None, pq: tuple[int, int] | None) -> Any:
    rows, dim = vectors.shape
    lists = nlist or _default_nlist(rows)
    if lists > rows:
        raise ConfigError(
            f"nlist={lists} exceeds the {rows} vectors to index (--nlist); pass at most {rows}"
        )
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(dim)
    index: Any
    if pq is None:
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % pq[0]:
            raise ConfigError(
                f"pq_m={pq[0]} sub-quantizers must divide the dim {dim} (--pq-m); pass a divisor"
            )
        index = faiss.IndexIVFPQ(quantizer, dim, lists, pq[0], pq[1], faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.train(vectors)
    return index


def _flat(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    return _faiss().IndexFlatIP(vectors.shape[1])


def _ivf(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    return _inverted_lists(vectors, options["nlist"], None)


def _hnsw(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(vectors.shape[1], options["m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options["ef_construction"]
    return index


def _ivfpq(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    defaults = _default_pq(vectors.shape[1], vectors.shape[0])
    pq = (options["pq_m"] or defaults[0], options["pq_bits"] or defaults[1])
    return _inverted_lists(vectors, options["nlist"], pq)


def _sq8(vectors: np.ndarray, options: Mapping[str, Any]) -> Any:
    faiss = _faiss()
    quantizer = faiss.ScalarQuantizer.QT_8bit
    index = faiss.IndexScalarQuantizer(vectors.shape[1], quantizer, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return index


def _no_search_parameters(index: Any, info: Mapping[str, Any]) -> None:
    return None


def _probe_lists(index: Any, info: Mapping[str, Any]) -> None:
    index.nprobe = min(info["nprobe"], info["nlist"])


def _search_beam(index: Any, info: Mapping[str, Any]) -> None:
    index.hnsw.efSearch = max(info["ef_search"], info.get("k", 1))  # a beam of k or more


def _no_built_parameters(index: Any) -> dict[str, int]:
    return {}


def _lists(index: Any) -> dict[str, int]:
    return {"nlist": int(index.nlist)}


def _lists_and_codes(index: Any) -> dict[str, int]:
    return {**_lists(index), "pq_m": int(index.pq.M), "pq_bits": int(index.pq.nbits)}


@dataclass(frozen=True)
class IndexRecipe:
    """How one index kind is built and searched: ``build(vectors, options)`` returns the
    FAISS index (trained, empty), ``tune(index, info)`` sets its search-time parameters from
    the saved ``info``, ``built(index)`` the parameters chosen at build time that ``info``
    records (``nlist``, ``pq_m``, ``pq_bits``)."""

    build: Callable[[np.ndarray, Mapping[str, Any]], Any]
    tune: Callable[[Any, Mapping[str, Any]], None] = _no_search_parameters
    built: Callable[[Any], dict[str, int]] = _no_built_parameters


INDEX_KINDS: dict[str, IndexRecipe] = {
    "flat": IndexRecipe(_flat),
    "ivf": IndexRecipe(_ivf, _probe_lists, _lists),
    "hnsw": IndexRecipe(_hnsw, _search_beam),
    "ivfpq": IndexRecipe(_ivfpq, _probe_lists, _lists_and_codes),
    "sq8": IndexRecipe(_sq8),
}
"""Each index kind and its recipe: ``flat`` (exact), ``ivf`` (inverted lists), ``hnsw``
(graph), ``ivfpq`` (inverted lists of product-quantized codes) or ``sq8`` (exact scan over
8-bit scalar-quantized vectors). Adding a kind is its functions plus one line here."""


def index_recipe(kind: str) -> IndexRecipe:
    """The recipe of ``kind``, or a :class:`~mmalign.errors.ConfigError` listing the kinds.

    Example:
        >>> index_recipe("hnsw").tune.__name__
        '_search_beam'
        >>> try:
        ...     index_recipe("lsh")
        ... except ConfigError as error:
        ...     print(str(error)[:60])
        index kind must be one of auto, flat, ivf, hnsw, ivfpq, sq8,
    """
    if kind not in INDEX_KINDS:
        raise ConfigError(
            f"index kind must be one of auto, {', '.join(INDEX_KINDS)}, not {kind!r} "
            "(--index); pick one of those"
        )
    return INDEX_KINDS[kind]


ADD_BATCH = 65_536
"""Vectors added to an index per call (one progress-bar update)."""


def _add(index: Any, vectors: np.ndarray, desc: str) -> None:
    """Add ``vectors`` in batches of :data:`ADD_BATCH`, with a progress bar (rate, ETA)."""
    with progress_bar(total=len(vectors), desc=desc, unit="vector") as bar:
        for start in range(0, len(vectors), ADD_BATCH):
            batch = vectors[start : start + ADD_BATCH]
            index.add(batch)
            bar.update(len(batch))


LOWEST = {"nlist": 1, "nprobe": 1, "m": 2, "ef_search": 1, "ef_construction": 1, "pq_m": 1}
"""The smallest value of each index parameter (``None`` means the default where allowed);
``pq_bits`` is 1 to 16. FAISS aborts the process on some values below these (``m`` 0)."""
HIGHEST = {
    "nlist": 1 << 24,
    "nprobe": 1 << 24,
    "m": 256,
    "ef_search": 1 << 16,
    "ef_construction": 1 << 16,
    "pq_m": 4096,
}
"""The largest value of each index parameter: far beyond any useful setting, and below what
makes FAISS fail (``m`` 2^31 - 1 is a C++ length error, a huge ``ef_search`` is stored and
then overflows at every search)."""


def check_index_options(options: Mapping[str, Any], where: str = "") -> None:
    """A :class:`~mmalign.errors.ConfigError` naming the flag (and ``where`` the values come
    from) of the first index parameter out of range.

    Example:
        >>> check_index_options({"m": 0})
        Traceback (most recent call last):
        ...
        mmalign.errors.ConfigError: index parameter m must be an integer between 2 and 256, ...
    """
    for name, value in options.items():
        if value is None and name in ("nlist", "pq_m", "pq_bits"):
            continue
        low, high = (1, 16) if name == "pq_bits" else (LOWEST[name], HIGHEST[name])
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"index parameter {name} must be an integer {bound}, got {value!r} ({flag}"
                f"{f'; {where}' if where else ''}); pass a value in range"
            )


def _index_paths(out_dir: Path, modality: str) -> dict[str, Path]:
    base = out_dir / INDEX_DIR
    return {ext: base / f"{modality}.{ext}" for ext in ("faiss", "json", "parquet")}


def _indexed_vectors(
    out_dir: Path, modality: str, dim: int | None
) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """The present rows of one modality, truncated to ``dim`` (renormalized), float32."""
    exported, table = load_embeddings(out_dir, modality)
    keep = np.asarray(table.column(f"present_{modality}").to_pylist(), dtype=bool)
    vectors = torch.from_numpy(np.asarray(exported[keep], dtype=np.float32))
    if vectors.shape[0] == 0:
        raise ValueError(f"{out_dir}: no exported sample has the {modality!r} modality")
    if dim is not None and dim != vectors.shape[1]:
        check_prefix(dim, vectors.shape[1], read_manifest(out_dir)["settings"].get("matryoshka"))
        vectors = truncate(vectors, dim)
    return np.ascontiguousarray(vectors.numpy()), table, keep


def build_index(
    out_dir: str | Path,
    modality: str,
    kind: str | None = None,
    *,
    dim: int | None = None,
    nlist: int | None = None,
    nprobe: int = 16,
    m: int = 32,
    ef_search: int = 64,
    ef_construction: int = 80,
    pq_m: int | None = None,
    pq_bits: int | None = None,
) -> Path:
    """A FAISS inner-product index over one modality of a finished export.

    ``kind``: ``None`` or ``"auto"`` picks by the number of vectors (:func:`default_kind`:
    ``flat`` below 20,000, ``hnsw`` below 1,000,000, ``ivfpq`` above). ``flat`` is exact;
    approximate are ``ivf`` (``nlist`` lists, default about 4 sqrt(N); ``nprobe`` searched),
    ``hnsw`` (``m`` links per node, ``ef_search``/``ef_construction`` beam widths),
    ``ivfpq`` (IVF lists of ``pq_m``-byte product-quantized codes; default ``pq_m`` the
    largest divisor of the dim up to dim/4, ``pq_bits`` 8) and ``sq8`` (8-bit scalar
    quantization, exact scan: 4x smaller than float32). ``dim`` indexes the first ``dim``
    coordinates, renormalized (a Matryoshka prefix; warns when the exported model did not
    train it). Rows where the modality is absent are left out. Writes
    ``OUT/index/{modality}.faiss``, ``.json`` (parameters, ``bytes`` on disk and
    ``bytes_per_vector``) and ``.parquet`` (key and metadata per index row); returns the
    ``.faiss`` path.

    Example:
        >>> build_index("emb", "image", kind="ivfpq", dim=32)  # doctest: +SKIP
        PosixPath('emb/index/image.faiss')
    """
    out_dir = Path(out_dir)
    parameters = {"nlist": nlist, "nprobe": nprobe, "m": m, "ef_search": ef_search}
    parameters |= {"ef_construction": ef_construction, "pq_m": pq_m, "pq_bits": pq_bits}
    check_index_options(parameters)
    refuse_links(out_dir, "export directory", "--out")
    vectors, table, keep = _indexed_vectors(out_dir, modality, dim)
    kind = default_kind(vectors.shape[0]) if kind in (None, "auto") else kind
    recipe = index_recipe(kind)
    options = {"nlist": nlist, "m": m, "ef_construction": ef_construction}
    index = recipe.build(vectors, options | {"pq_m": pq_m, "pq_bits": pq_bits})
    _add(index, vectors, f"index {modality} ({kind})")
    serialized = _faiss().serialize_index(index)
    rows = int(vectors.shape[0])
    info = {
        "modality": modality,
        "kind": kind,
        "rows": rows,
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "nlist": None,
        "nprobe": nprobe,
        "m": m,
        "ef_search": ef_search,
        "ef_construction": ef_construction,
        "pq_m": None,
        "pq_bits": None,
        "bytes": int(serialized.size),
        "bytes_per_vector": float(serialized.size / rows),
    } | recipe.built(index)
    paths = _index_paths(out_dir, modality)
    kept = table.filter(pa.array(keep))
    atomic_write(paths["parquet"], lambda handle: pq.write_table(kept, handle))

    def write_index(handle: IO[bytes]) -> None:
        handle.write(serialized.tobytes())

    atomic_write(paths["faiss"], write_index)
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
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k} (--k); ask for one result or more")
        k = min(k, self.info["rows"])  # no more rows exist (and HNSW's beam is a C int)
        index_recipe(self.info["kind"]).tune(self.index, {**self.info, "k": k})
        scores, rows = self.index.search(queries, k)
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


def prefix_index(out_dir: str | Path, modality: str, dim: int) -> EmbeddingIndex:
    """An exact (flat) index in memory over the first ``dim`` coordinates of one modality's
    exported embeddings, renormalized: what :func:`build_index` with ``kind="flat"`` and
    ``dim`` writes, without writing it (to serve a Matryoshka prefix of a full-width export).

    Example:
        >>> prefix_index("emb", "image", 16).info["dim"]  # doctest: +SKIP
        16
    """
    vectors, table, keep = _indexed_vectors(Path(out_dir), modality, dim)
    index = _faiss().IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    rows, width = int(vectors.shape[0]), int(vectors.shape[1])
    info = {"modality": modality, "kind": "flat", "rows": rows, "dim": width}
    return EmbeddingIndex(
        index=index, info=info | {"metric": "inner_product"}, table=table.filter(pa.array(keep))
    )


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
    check_index_options(
        {name: info.get(name) for name in (*LOWEST, "pq_bits") if name in info},
        f"stored in {paths['json']}",
    )
    index = _faiss().deserialize_index(np.fromfile(paths["faiss"], dtype=np.uint8))
    index_recipe(info["kind"]).tune(index, info)
    return EmbeddingIndex(index=index, info=info, table=pq.read_table(paths["parquet"]))
