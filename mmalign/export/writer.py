"""Embeddings to files, a FAISS nearest-neighbour index, and search.

``export_embeddings`` reads shards in order (unshuffled, one pass) and writes, per chunk of
``chunk_size`` samples::

    OUT/{modality}/chunk-000000.npy    [rows, dim] float16/float32 (NaN rows: modality absent)
    OUT/meta/chunk-000000.parquet      key, present_{modality}, the chosen metadata fields
    OUT/manifest.json                  settings and the list of completed chunks (written last)

Every file is written to a temporary name, fsynced and renamed, and a chunk is listed in the
manifest only after all its files are in place, so an interrupted export never leaves a
partial chunk that counts as complete; running it again continues after the last listed chunk
without recomputing the finished ones (records are still read to find the position). Under
``accelerate launch`` / ``torchrun`` each rank reads its share of the shards, writes chunks
``chunk-r{rank}-000000`` and its own ``manifest-r{rank}.json``; the final ``manifest.json``
lists the chunks of every rank.

``build_index`` writes ``OUT/index/{modality}.faiss`` (inner product: cosine for normalized
embeddings) with ``{modality}.json`` (parameters) and ``{modality}.parquet`` (the key and
metadata of each indexed row, in index order); ``search`` encodes a query with the model and
returns the nearest rows.

Example:
    >>> export_embeddings(model, "data/digits/test-000000.tar", ["image"], "emb")  # doctest: +SKIP
    >>> build_index("emb", "image", kind="hnsw")  # doctest: +SKIP
    >>> search("emb", model, "the digit seven", "text", k=3)[0]["key"]  # doctest: +SKIP
    'test-000123'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mmalign.eval.loading import EmbeddedBatch, EmbeddingStream, load_model, model_directory
from mmalign.files import LOCK_NAME, DirectoryLock

FORMAT = "mmalign-embeddings/1"
MANIFEST = "manifest.json"
META_DIR = "meta"
INDEX_DIR = "index"
DTYPES = {"float16": np.float16, "float32": np.float32}


class ExportError(RuntimeError):
    """An export directory does not match the requested export, or is incomplete."""


# ----------------------------------------------------------------------------- atomic files


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], tag: str = "") -> None:
    """Write ``path`` through a temporary file: write, flush, fsync, rename, fsync the folder.

    ``tag`` makes the temporary name unique per writer (processes writing the same file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{tag}")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _write_json(path: Path, data: Mapping[str, Any], tag: str = "") -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()), tag)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- export


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes and bytes).

    Example:
        >>> len(model_fingerprint(torch.nn.Linear(2, 2)))
        64
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


@dataclass
class _Process:
    rank: int
    world_size: int
    barrier: Callable[[], None] | None


def _process(rank: int | None, world_size: int | None) -> _Process:
    """This process's rank: as given, else from torch.distributed / Accelerate, else 0 of 1."""
    if rank is not None or world_size is not None:
        return _Process(rank or 0, world_size or 1, None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _Process(
            torch.distributed.get_rank(),
            torch.distributed.get_world_size(),
            torch.distributed.barrier,
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return _Process(state.process_index, state.num_processes, state.wait_for_everyone)
    return _Process(0, 1, None)


def _chunk_name(process: _Process, index: int) -> str:
    prefix = "chunk-" if process.world_size == 1 else f"chunk-r{process.rank}-"
    return f"{prefix}{index:06d}"


def _progress_file(out_dir: Path, process: _Process) -> Path:
    return out_dir / (MANIFEST if process.world_size == 1 else f"manifest-r{process.rank}.json")


def _export_lock(out_dir: Path, process: _Process) -> DirectoryLock:
    """This process's lock on ``out_dir``: a second export there refuses, naming the first."""
    name = LOCK_NAME if process.world_size == 1 else f"{LOCK_NAME}-r{process.rank}"
    return DirectoryLock(out_dir, name, user="export", advice="export into another directory")


def _arrow_column(values: list[Any]) -> pa.Array:
    """Metadata values as an Arrow column; values Arrow cannot type are stored as JSON text."""
    values = [value.tolist() if isinstance(value, np.ndarray) else value for value in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([json.dumps(value, default=str) for value in values])


def _write_chunk(
    out_dir: Path, name: str, chunk: EmbeddedBatch, dtype: str, tag: str
) -> dict[str, Any]:
    """Write one chunk's files atomically; returns its manifest entry."""
    files = {}
    for modality, embedding in chunk.embeddings.items():
        values = torch.where(chunk.present[modality][:, None], embedding, torch.nan)
        array = values.numpy().astype(DTYPES[dtype])
        relative = f"{modality}/{name}.npy"
        atomic_write(out_dir / relative, lambda handle, a=array: np.save(handle, a), tag)
        files[modality] = relative
    columns = {"key": pa.array(chunk.keys, pa.string())}
    columns |= {f"present_{m}": pa.array(mask.tolist()) for m, mask in chunk.present.items()}
    columns |= {field: _arrow_column(values) for field, values in chunk.metadata.items()}
    relative = f"{META_DIR}/{name}.parquet"
    table = pa.table(columns)
    atomic_write(out_dir / relative, lambda handle: pq.write_table(table, handle), tag)
    files["meta"] = relative
    return {"name": name, "rows": len(chunk), "files": files}


def _check_settings(path: Path, found: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    changed = [
        f"{name}: {found.get(name)!r} there, {wanted[name]!r} now"
        for name in wanted
        if name != "model_path" and found.get(name) != wanted[name]
    ]
    if changed:
        raise ExportError(
            f"{path} belongs to an export with other settings ({'; '.join(changed)}); "
            "export into a new directory, or delete this one to start over"
        )


def _settings(
    model: Any,
    model_path: str | None,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    options: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "modalities": list(modalities),
        "dim": int(model.dim),
        "shards": shards if isinstance(shards, str) else [str(s) for s in shards],
        "model_fingerprint": model_fingerprint(model),
        "model_path": model_path,
        **options,
    }


def merge_manifests(out_dir: str | Path, world_size: int) -> dict[str, Any] | None:
    """Write ``manifest.json`` from the per-rank manifests once every rank has completed.

    Returns the merged manifest, or ``None`` while some rank is unfinished.
    """
    out_dir = Path(out_dir)
    parts = [_read_json(out_dir / f"manifest-r{rank}.json") for rank in range(world_size)]
    if any(part is None or not part["complete"] for part in parts):
        return None
    counters: dict[str, int] = {}
    for part in parts:
        for name, value in part["counters"].items():
            counters[name] = counters.get(name, 0) + value
    merged = {
        "settings": parts[0]["settings"],
        "complete": True,
        "chunks": [chunk for part in parts for chunk in part["chunks"]],
        "rows": sum(part["rows"] for part in parts),
        "counters": counters,
    }
    _write_json(out_dir / MANIFEST, merged, tag=f"-merge{os.getpid()}")
    return merged


def export_embeddings(
    model: Any,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    chunk_size: int = 4096,
    dtype: Literal["float16", "float32"] = "float16",
    metadata_fields: Sequence[str] = (),
    fields: Mapping[str, str] | None = None,
    workers: int = 0,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Embed every record of ``shards`` into chunked ``.npy`` files plus Parquet metadata.

    ``model`` is an :class:`~mmalign.AlignmentModel` or a model/run directory; ``fields``
    maps modalities to record extensions (default: the run's config, else per tower type);
    ``metadata_fields`` are record extensions copied into the Parquet files (``txt``,
    ``cls``, ``json``). An unfinished export in ``out_dir`` with the same settings resumes.
    ``rank``/``world_size`` default to the launcher's (torch.distributed / Accelerate).
    Returns the manifest (merged over ranks once all have finished).

    Example:
        >>> export_embeddings("runs/digits", "data/digits/test-000000.tar", ["image", "text"],
        ...                   "emb", metadata_fields=["cls"])["rows"]  # doctest: +SKIP
        180
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be positive")
    model_path = None if isinstance(model, torch.nn.Module) else str(model_directory(model))
    model = load_model(model)
    process = _process(rank, world_size)
    out_dir = Path(out_dir)
    options = {
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "dtype": dtype,
        "metadata_fields": list(metadata_fields),
        "fields": dict(fields) if fields else None,
        "workers": workers,
        "world_size": process.world_size,
    }
    settings = _settings(model, model_path, shards, modalities, options)
    progress_file = _progress_file(out_dir, process)
    with _export_lock(out_dir, process):
        fresh = {"settings": settings, "complete": False, "chunks": [], "rows": 0, "counters": {}}
        state = _read_json(progress_file) or fresh
        _check_settings(progress_file, state["settings"], settings)
        if not state["complete"]:
            _run_export(model, shards, modalities, out_dir, state, process, progress, model_path)
    if process.world_size == 1:
        return state
    if process.barrier is not None:
        process.barrier()
    return merge_manifests(out_dir, process.world_size) or state


def _run_export(
    model: Any,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    out_dir: Path,
    state: dict[str, Any],
    process: _Process,
    progress: bool,
    model_path: str | None,
) -> None:
    """Stream the records, skipping the model on rows of finished chunks; updates ``state``."""
    settings = state["settings"]
    chunk_size, tag = settings["chunk_size"], f"-r{process.rank}"
    done_rows = len(state["chunks"]) * chunk_size
    progress_file = _progress_file(out_dir, process)
    loader = EmbeddingStream(
        model,
        shards,
        modalities,
        skip_rows=done_rows,
        fields=settings["fields"],
        run_dir=model_path,
        batch_size=settings["batch_size"],
        workers=settings["workers"],
        metadata_fields=settings["metadata_fields"],
        rank=process.rank,
        world_size=process.world_size,
    )
    pending: list[EmbeddedBatch] = []
    pending_rows = 0
    bar = tqdm(
        desc="export" if process.world_size == 1 else f"export r{process.rank}",
        unit="sample",
        initial=done_rows,
        disable=not progress,
        position=process.rank,
    )

    def flush(chunk: EmbeddedBatch, final: bool) -> None:
        name = _chunk_name(process, len(state["chunks"]))
        state["chunks"].append(_write_chunk(out_dir, name, chunk, settings["dtype"], tag))
        state["rows"] += len(chunk)
        if final:
            state["counters"] = dict(loader.counters)
            state["complete"] = True
        _write_json(progress_file, state, tag)

    with bar:
        for batch in loader:
            bar.update(len(batch))
            pending.append(batch)
            pending_rows += len(batch)
            while pending_rows >= chunk_size:
                joined = EmbeddedBatch.concatenate(pending)
                flush(joined[:chunk_size], final=False)
                rest = joined[chunk_size:]
                pending, pending_rows = ([rest] if len(rest) else []), len(rest)
    if pending_rows:
        flush(EmbeddedBatch.concatenate(pending), final=True)
    else:
        state["counters"] = dict(loader.counters)
        state["complete"] = True
        _write_json(progress_file, state, tag)


# ----------------------------------------------------------------------------- reading


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished export (every rank done), or an :class:`ExportError`."""
    path = Path(out_dir) / MANIFEST
    manifest = _read_json(path)
    if manifest is None or not manifest.get("complete"):
        raise ExportError(
            f"{out_dir} holds no finished export ({MANIFEST} missing or incomplete); run "
            "export_embeddings (mmalign export) there first, or again to finish it"
        )
    return manifest


def load_embeddings(out_dir: str | Path, modality: str) -> tuple[np.ndarray, pa.Table]:
    """All rows of one modality of a finished export: ``[N, dim]`` embeddings (NaN rows where
    the modality is absent) and the Parquet metadata table (key, present_*, fields).

    Example:
        >>> vectors, table = load_embeddings("emb", "image")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if modality not in manifest["settings"]["modalities"]:
        raise ValueError(
            f"{out_dir} has no {modality!r} embeddings; exported: "
            f"{manifest['settings']['modalities']}"
        )
    chunks = manifest["chunks"]
    vectors = [np.load(out_dir / chunk["files"][modality]) for chunk in chunks]
    tables = [pq.read_table(out_dir / chunk["files"]["meta"]) for chunk in chunks]
    dim = manifest["settings"]["dim"]
    array = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return array, table


# ----------------------------------------------------------------------------- index

IndexKind = Literal["flat", "ivf", "hnsw"]


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
    _write_json(paths["json"], info)
    return paths["faiss"]


@dataclass
class EmbeddingIndex:
    """A loaded index: the FAISS index, its parameters, and the metadata row of each entry."""

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
    """Modalities with a built index in an export directory."""
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
    info = json.loads(paths["json"].read_text())
    index = faiss.deserialize_index(np.fromfile(paths["faiss"], dtype=np.uint8))
    _set_search_parameters(index, info)
    return EmbeddingIndex(index=index, info=info, table=pq.read_table(paths["parquet"]))


def search(
    index_dir: str | Path,
    model: Any,
    query: Any,
    modality: str,
    k: int = 10,
    *,
    target: str | None = None,
) -> list[dict[str, Any]]:
    """Encode one raw ``query`` of ``modality`` and return the ``k`` nearest indexed rows.

    ``target`` is the indexed modality (default: the only one built in ``index_dir``);
    ``model`` is a model, a model/run directory, or ``None`` for the model the export
    recorded. Each row: ``rank``, ``score`` (inner product), ``key``, ``present_*`` and the
    exported metadata fields.

    Example:
        >>> search("emb", None, "a handwritten seven", "text", k=3)  # doctest: +SKIP
        [{'rank': 1, 'score': 0.83, 'key': 'test-000017', ...}, ...]
    """
    loaded = load_index(index_dir, target)
    if model is None:
        model = read_manifest(index_dir)["settings"].get("model_path")
        if model is None:
            raise ValueError(
                f"{index_dir} was exported from an in-memory model; pass the model to search"
            )
    model = load_model(model)
    vector = model.encode(modality, [query], batch_size=1)
    return loaded.search(vector, k)[0]


# ----------------------------------------------------------------------------- commands


def run_export(
    model: Any,
    shards: str | Sequence[str],
    modalities: Sequence[str] | None,
    out_dir: str | Path,
    *,
    index: IndexKind | None = None,
    index_options: Mapping[str, Any] | None = None,
    **export_options: Any,
) -> dict[str, Any]:
    """``mmalign export``: export (or resume), then optionally index every modality.

    ``modalities=None`` exports all of the model's; ``export_options`` are those of
    :func:`export_embeddings`, ``index_options`` those of :func:`build_index`. Returns the
    manifest with ``"indexes"`` (the ``.faiss`` paths) added.

    In a multi-process launch only rank 0 builds the indexes.

    Example:
        >>> run_export("runs/digits", "data/digits/test-000000.tar", None, "emb",
        ...            index="hnsw")["indexes"]  # doctest: +SKIP
    """
    model = model if isinstance(model, torch.nn.Module) else str(model_directory(model))
    if modalities is None:
        modalities = load_model(model).modalities
    manifest = export_embeddings(model, shards, modalities, out_dir, **export_options)
    process = _process(export_options.get("rank"), export_options.get("world_size"))
    indexes = []
    finished = _read_json(Path(out_dir) / MANIFEST)
    if index is not None and process.rank == 0 and finished and finished["complete"]:
        indexes = [
            str(build_index(out_dir, modality, index, **(index_options or {})))
            for modality in modalities
        ]
    return {**manifest, "indexes": indexes}


def resolve_query_modality(model: Any, name: str) -> str:
    """A modality name, or a tower type (``text``, ``image``, ``audio``) naming the model's
    first modality of that type."""
    if name in model.modalities:
        return name
    for modality in model.modalities:
        if model.config.towers[modality]["type"] == name:
            return modality
    raise ValueError(
        f"the model has no modality or tower type {name!r}; modalities: {model.modalities}"
    )


def run_search(
    index_dir: str | Path,
    query: Mapping[str, Any],
    k: int = 10,
    *,
    model: Any = None,
    target: str | None = None,
) -> list[dict[str, Any]]:
    """``mmalign search``: ``query`` is one ``{modality or tower type: raw sample}`` entry,
    e.g. ``{"text": "a seven"}`` or ``{"image": "digit.png"}``; ``model`` defaults to the
    one the export recorded. Returns the rows of :func:`search`.

    Example:
        >>> run_search("emb", {"text": "the digit seven"}, k=5)[0]["key"]  # doctest: +SKIP
    """
    if len(query) != 1:
        raise ValueError(
            f"give exactly one query (--text, --image, --audio or --query); got {len(query)}"
        )
    if model is None:
        model = read_manifest(index_dir)["settings"].get("model_path")
    if model is None:
        raise ValueError(f"{index_dir} was exported from an in-memory model; pass --model")
    model = load_model(model)
    ((name, raw),) = query.items()
    modality = resolve_query_modality(model, name)
    return search(index_dir, model, _parse_raw(model, modality, raw), modality, k, target=target)


def _parse_raw(model: Any, modality: str, raw: Any) -> Any:
    """Command-line values: a JSON list for tabular towers, a JSON file for graph towers."""
    kind = model.config.towers[modality]["type"]
    if isinstance(raw, str) and kind == "tabular":
        return json.loads(raw)
    if isinstance(raw, str) and kind == "graph" and raw.endswith(".json"):
        return json.loads(Path(raw).read_text())
    return raw
