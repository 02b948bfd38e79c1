"""Embeddings to files: the chunked, resumable, multi-rank export.

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
lists the chunks of every rank. ``run_export`` (``mmalign export``) adds the indexes.

A model with a non-finite weight is refused before anything is written. A row whose
embedding still comes out non-finite is written as absent (NaN, ``present_*`` false) and
counted under ``nonfinite_embeddings/<modality>`` in the manifest's counters, so a NaN row
is never marked present. A full disk is an :class:`ExportError`: the listed chunks are
whole and running the same export again continues.

Example:
    >>> export_embeddings(model, "data/digits/test-000000.tar", ["image"], "emb")  # doctest: +SKIP
    >>> run_export("runs/digits", "data/digits/test-000000.tar", None, "emb",
    ...            index="hnsw")["indexes"]  # doctest: +SKIP
    ['emb/index/image.faiss', 'emb/index/text.faiss']
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmalign.data.exports import MANIFEST, META_DIR, ExportError, same_sources, shard_stamps
from mmalign.data.shards import normalize_shards
from mmalign.dist import barrier, join_launched_group, resolve_world
from mmalign.embeddings import check_prefix, truncate
from mmalign.eval.loading import (
    EmbeddedBatch,
    EmbeddingStream,
    check_modalities,
    load_model,
    model_directory,
    resolve_fields,
)
from mmalign.export.index import INDEX_DIR, build_index, check_index_options, index_recipe
from mmalign.export.items import ITEMS_DIR, MAX_ITEM_BYTES, keep_items
from mmalign.files import (
    LOCK_NAME,
    DirectoryLock,
    atomic_write,
    read_json,
    refuse_links,
    write_json,
)
from mmalign.progress import progress_bar

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

FORMAT = "mmalign-embeddings/1"
"""The ``format`` recorded in an export's settings."""
DTYPES = {"float16": np.float16, "float32": np.float32}
"""The embedding dtypes an export can write."""


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


@dataclass(frozen=True)
class _Share:
    """This process's share of an export: the directory, its rank among ``world_size``."""

    out_dir: Path
    rank: int
    world_size: int

    def chunk_name(self, index: int) -> str:
        prefix = "chunk-" if self.world_size == 1 else f"chunk-r{self.rank}-"
        return f"{prefix}{index:06d}"

    @property
    def progress_file(self) -> Path:
        single = self.world_size == 1
        return self.out_dir / (MANIFEST if single else f"manifest-r{self.rank}.json")

    @property
    def tag(self) -> str:
        """Suffix of this process's temporary files."""
        return f"-r{self.rank}"

    def lock(self) -> DirectoryLock:
        """This process's lock on the directory: a second export there refuses, naming us."""
        name = LOCK_NAME if self.world_size == 1 else f"{LOCK_NAME}-r{self.rank}"
        return DirectoryLock(
            self.out_dir, name, user="export", advice="export into another directory"
        )


def _arrow_column(values: list[Any]) -> pa.Array:
    """Metadata values as an Arrow column; values Arrow cannot type (or hold: an integer
    beyond int64) are stored as JSON text."""
    values = [value.tolist() if isinstance(value, np.ndarray) else value for value in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([json.dumps(value, default=str) for value in values])


def _check_finite_weights(model: torch.nn.Module, source: str | None) -> None:
    """Refuse a model with a NaN/Inf weight (a diverged run): its embeddings are garbage."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(
                f"the model{f' in {source}' if source else ''} has non-finite values in "
                f"'{name}' (its training diverged); export a model from a healthy checkpoint "
                "or retrain with a lower train.lr"
            )


def _drop_nonfinite_rows(chunk: EmbeddedBatch, counts: dict[str, int]) -> None:
    """Mark rows whose embedding is not finite as absent, counting them per modality."""
    for modality, embedding in chunk.embeddings.items():
        present = chunk.present[modality]
        bad = present & ~torch.isfinite(embedding).all(dim=1)
        if bool(bad.any()):
            chunk.present[modality] = present & ~bad
            key = f"nonfinite_embeddings/{modality}"
            counts[key] = counts.get(key, 0) + int(bad.sum())


def _write_chunk(
    out_dir: Path, name: str, chunk: EmbeddedBatch, settings: Mapping[str, Any], tag: str
) -> dict[str, Any]:
    """Write one chunk's files atomically (embeddings truncated to ``settings["dim"]``);
    returns its manifest entry."""
    files, dtype = {}, settings["dtype"]
    for modality, embedding in chunk.embeddings.items():
        if embedding.shape[1] != settings["dim"]:
            embedding = truncate(embedding, settings["dim"])
        values = torch.where(chunk.present[modality][:, None], embedding, torch.nan)
        array = values.numpy().astype(DTYPES[dtype])
        relative = f"{modality}/{name}.npy"
        atomic_write(out_dir / relative, functools.partial(np.save, arr=array), tag)
        files[modality] = relative
    columns = {"key": pa.array(chunk.keys, pa.string())}
    columns |= {f"present_{m}": pa.array(mask.tolist()) for m, mask in chunk.present.items()}
    columns |= {field: _arrow_column(values) for field, values in chunk.metadata.items()}
    relative = f"{META_DIR}/{name}.parquet"
    table = pa.table(columns)
    atomic_write(out_dir / relative, lambda handle: pq.write_table(table, handle), tag)
    files["meta"] = relative
    return {"name": name, "rows": len(chunk), "files": files}


def _refuse_foreign(out_dir: Path, modalities: Sequence[str]) -> None:
    """Refuse an ``out_dir`` holding what no export writes (a run, a folder of the user's
    files): the export would add its files among them and replace any of the same name."""
    own = {*modalities, META_DIR, INDEX_DIR, ITEMS_DIR}
    foreign = sorted(
        path.name
        for path in out_dir.iterdir()
        if not (
            path.name.startswith(".")  # locks, temporary files
            or path.name in own
            or re.fullmatch(r"manifest(-r\d+)?\.json", path.name)
        )
    )
    if foreign:
        raise ExportError(
            f"{out_dir} holds files an export did not write ({', '.join(foreign[:3])}) "
            "(--out); export into a new or empty directory"
        )


def _read_progress(path: Path) -> dict[str, Any] | None:
    """The export's progress (its manifest so far), ``None`` before the first chunk; a file
    that is not an export manifest is an :class:`ExportError` naming it."""
    try:
        state = read_json(path)
    except (ValueError, UnicodeDecodeError):
        state = False
    if state is None:
        return None
    settings = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ExportError(
            f"{path} is not the manifest of an mmalign export (--out); export into a new or "
            "empty directory"
        )
    return dict(state)


def _same_setting(name: str, found: Any, wanted: Any) -> bool:
    if name == "source_shards":  # the same content, perhaps touched since
        return isinstance(found, dict) and same_sources(found, wanted)
    return bool(found == wanted)


def _check_settings(path: Path, found: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    changed = [
        f"{name}: changed"
        if name == "source_shards"
        else f"{name}: {found.get(name)!r} there, {wanted[name]!r} now"
        for name in wanted
        if name != "model_path" and not _same_setting(name, found.get(name), wanted[name])
    ]
    if changed:
        raise ExportError(
            f"{path} belongs to an export with other settings ({'; '.join(changed)}); "
            "export into a new directory, or delete this one to start over"
        )


def _settings(
    model: AlignmentModel,
    model_path: str | None,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    options: Mapping[str, Any],
    dim: int | None = None,
) -> dict[str, Any]:
    """What an export records: its options, the model, the shards and their sizes,
    modification times and content digests (``source_shards``, checked by the tools that read
    the source records again), and the record extension of each modality (``extensions``:
    ``fields`` resolved)."""
    return {
        "format": FORMAT,
        "modalities": list(modalities),
        "dim": int(dim or model.dim),
        "matryoshka": model.config.matryoshka,
        "shards": normalize_shards(shards),
        "source_shards": shard_stamps(shards),
        "extensions": resolve_fields(model, modalities, options["fields"], model_path),
        "model_fingerprint": model_fingerprint(model),
        "model_path": model_path,
        **options,
    }


def merge_manifests(out_dir: str | Path, world_size: int) -> dict[str, Any] | None:
    """Write ``manifest.json`` from the per-rank manifests once every rank has completed.

    Returns the merged manifest, or ``None`` while some rank is unfinished.

    Example:
        >>> merge_manifests("emb", world_size=2)["rows"]  # doctest: +SKIP
        180
    """
    out_dir = Path(out_dir)
    parts = [read_json(out_dir / f"manifest-r{rank}.json") for rank in range(world_size)]
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
    write_json(out_dir / MANIFEST, merged, tag=f"-merge{os.getpid()}")
    return merged


def export_embeddings(
    model: AlignmentModel,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    chunk_size: int = 4096,
    dtype: Literal["float16", "float32"] = "float16",
    dim: int | None = None,
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
    ``dim`` keeps the first ``dim`` coordinates of every embedding, renormalized (a
    Matryoshka prefix; warns when the model did not train it); ``metadata_fields`` are
    record extensions copied into the Parquet files (``txt``,
    ``cls``, ``json``). An unfinished export in ``out_dir`` with the same settings resumes.
    ``rank``/``world_size`` default to the launcher's (torch.distributed / Accelerate).
    Returns the manifest (merged over ranks once all have finished).

    Example:
        >>> export_embeddings("runs/digits", "data/digits/test-000000.tar", ["image", "text"],
        ...                   "emb", metadata_fields=["cls"])["rows"]  # doctest: +SKIP
        180
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype (--dtype) must be one of {sorted(DTYPES)}, not {dtype!r}")
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise ExportError(f"{name} ({flag}) must be >= 1, got {value}; pass a positive size")
    model_path = None if isinstance(model, torch.nn.Module) else str(model_directory(model))
    model = load_model(model)
    _check_finite_weights(model, model_path)
    check_modalities(model, modalities)
    if dim is not None:
        check_prefix(dim, model.dim, model.config.matryoshka)
    launched = rank is None and world_size is None
    rank, world_size = join_launched_group() if launched else resolve_world(rank, world_size)
    share = _Share(Path(out_dir), rank, world_size)
    options = {
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "dtype": dtype,
        "metadata_fields": list(metadata_fields),
        "fields": dict(fields) if fields else None,
        "workers": workers,
        "world_size": world_size,
    }
    settings = _settings(model, model_path, shards, modalities, options, dim)
    with share.lock():
        refuse_links(share.out_dir, "export directory", "--out")
        _refuse_foreign(share.out_dir, modalities)
        fresh: dict[str, Any] = {
            "settings": settings,
            "complete": False,
            "chunks": [],
            "rows": 0,
            "counters": {},
        }
        state = _read_progress(share.progress_file) or fresh
        _check_settings(share.progress_file, state["settings"], settings)
        if not state["complete"]:
            try:
                _run_export(model, shards, modalities, share, state, progress, model_path)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ExportError(
                    f"no space left on the device of {share.out_dir} (writing "
                    f"{error.filename or 'a chunk'}); the {len(state['chunks'])} chunks listed "
                    "are whole: free space and run the same export again to continue"
                ) from None
    if world_size == 1:
        return state
    if launched:
        barrier()
    return merge_manifests(share.out_dir, world_size) or state


def _run_export(
    model: AlignmentModel,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    share: _Share,
    state: dict[str, Any],
    progress: bool,
    model_path: str | None,
) -> None:
    """Stream the records, skipping the model on rows of finished chunks; updates ``state``."""
    settings = state["settings"]
    chunk_size, rank, world_size = settings["chunk_size"], share.rank, share.world_size
    done_rows = len(state["chunks"]) * chunk_size
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
        rank=rank,
        world_size=world_size,
    )
    pending: list[EmbeddedBatch] = []
    pending_rows = 0
    bar = progress_bar(
        desc="export" if world_size == 1 else f"export r{rank}",
        unit="sample",
        initial=done_rows,
        show=progress,
        position=rank,
    )

    def flush(chunk: EmbeddedBatch, final: bool) -> None:
        name = share.chunk_name(len(state["chunks"]))
        _drop_nonfinite_rows(chunk, state.setdefault("nonfinite", {}))
        state["chunks"].append(_write_chunk(share.out_dir, name, chunk, settings, share.tag))
        state["rows"] += len(chunk)
        if final:
            state["counters"] = {**loader.counters, **state["nonfinite"]}
            state["complete"] = True
        write_json(share.progress_file, state, share.tag)

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
        state["counters"] = {**loader.counters, **state.get("nonfinite", {})}
        state["complete"] = True
        write_json(share.progress_file, state, share.tag)


def run_export(
    model: AlignmentModel,
    shards: str | Sequence[str],
    modalities: Sequence[str] | None,
    out_dir: str | Path,
    *,
    index: str | None = None,
    index_options: Mapping[str, Any] | None = None,
    items: Sequence[str] = (),
    max_item_bytes: int = MAX_ITEM_BYTES,
    **export_options: Any,
) -> dict[str, Any]:
    """``mmalign export``: export (or resume), then optionally index every modality.

    ``modalities=None`` exports all of the model's; ``export_options`` are those of
    :func:`export_embeddings`, ``index_options`` those of
    :func:`~mmalign.export.build_index`. ``items`` names modalities whose source files are
    kept too (at most ``max_item_bytes`` each; :func:`~mmalign.export.items.keep_items`), so
    that ``mmalign serve`` can show a result. Returns the manifest with ``"indexes"`` (the
    ``.faiss`` paths) and ``"items"`` (counts per kept modality) added. An unknown ``index``
    kind, bad index options or an ``items`` modality the model lacks are refused before
    exporting.

    In a multi-process launch only rank 0 builds the indexes.

    Example:
        >>> run_export("runs/digits", "data/digits/test-000000.tar", None, "emb",
        ...            index="hnsw")["indexes"]  # doctest: +SKIP
        ['emb/index/image.faiss', 'emb/index/text.faiss']
    """
    if index not in (None, "auto"):
        index_recipe(index)
    check_index_options(index_options or {})  # before the export, not after it
    model = model if isinstance(model, torch.nn.Module) else str(model_directory(model))
    if modalities is None or items:
        known = load_model(model)
        check_modalities(known, items, "--keep-items")  # before the export, not after it
        modalities = known.modalities if modalities is None else modalities
    manifest = export_embeddings(model, shards, modalities, out_dir, **export_options)
    rank, _ = resolve_world(export_options.get("rank"), export_options.get("world_size"))
    indexes, kept = [], {}
    finished = read_json(Path(out_dir) / MANIFEST)
    if rank == 0 and finished and finished["complete"]:
        if index is not None:
            indexes = [
                str(build_index(out_dir, modality, index, **(index_options or {})))
                for modality in modalities
            ]
        if items:
            kept = keep_items(out_dir, model, items, max_item_bytes)
    return {**manifest, "indexes": indexes, "items": kept}
