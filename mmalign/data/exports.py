"""Reading a finished export: its manifest and the embeddings and metadata of one modality.

An export directory (written by :func:`mmalign.export.export_embeddings`) holds::

    OUT/{modality}/chunk-000000.npy    [rows, dim] float16/float32 (NaN rows: modality absent)
    OUT/meta/chunk-000000.parquet      key, present_{modality}, the chosen metadata fields
    OUT/manifest.json                  settings and the list of completed chunks (written last)

Example:
    >>> vectors, table = load_embeddings("emb", "image")  # doctest: +SKIP
    >>> vectors.shape[0] == table.num_rows == read_manifest("emb")["rows"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.data.shards import expand_shards, is_url
from mmalign.errors import UserError
from mmalign.files import read_json

MANIFEST = "manifest.json"
"""The manifest of a finished export (single process: also its progress file)."""
META_DIR = "meta"
"""The folder of the Parquet metadata chunks."""


class ExportError(UserError, RuntimeError):
    """An export directory does not match the requested export, or is incomplete.

    Example:
        >>> isinstance(ExportError("emb holds no finished export"), UserError)
        True
    """


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished export (every rank done), or an :class:`ExportError`.

    Example:
        >>> read_manifest("emb")["settings"]["modalities"]  # doctest: +SKIP
        ['image', 'text']
    """
    manifest = read_json(Path(out_dir) / MANIFEST)
    if manifest is None or not manifest.get("complete"):
        raise ExportError(
            f"{out_dir} holds no finished export: its manifest is missing or incomplete "
            f"({Path(out_dir) / MANIFEST}); run "
            "export_embeddings (mmalign export) there first, or again to finish it"
        )
    return manifest


class MissingModalityError(ExportError, ValueError):
    """An export holds no embeddings of the modality asked for."""


def load_embeddings(out_dir: str | Path, modality: str) -> tuple[np.ndarray, pa.Table]:
    """All rows of one modality of a finished export: ``[N, dim]`` embeddings (NaN rows where
    the modality is absent) and the Parquet metadata table (key, present_*, fields).

    Example:
        >>> vectors, table = load_embeddings("emb", "image")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if modality not in manifest["settings"]["modalities"]:
        exported = ", ".join(manifest["settings"]["modalities"])
        raise MissingModalityError(
            f"{out_dir} has no {modality!r} embeddings (the modality asked for); pick one it "
            f"exported: {exported}"
        )
    vectors = [np.load(out_dir / chunk["files"][modality]) for chunk in manifest["chunks"]]
    dim = manifest["settings"]["dim"]
    array = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return array, load_metadata(out_dir, manifest)


def load_metadata(out_dir: str | Path, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The Parquet metadata of every row of a finished export (key, present_*, fields), in
    row order (the order of every modality's embeddings).

    Example:
        >>> load_metadata("emb").column("key")[0].as_py()  # doctest: +SKIP
        'test-000000'
    """
    out_dir = Path(out_dir)
    chunks = (manifest or read_manifest(out_dir))["chunks"]
    tables = [pq.read_table(out_dir / chunk["files"]["meta"]) for chunk in chunks]
    return _concatenate(tables)


def _concatenate(tables: list[pa.Table]) -> pa.Table:
    """The chunks' metadata as one table; a column whose chunks Arrow cannot merge (a chunk
    stored its values as JSON text, another as numbers or structs) is JSON text throughout."""
    if not tables:
        return pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    types: dict[str, set[pa.DataType]] = {}
    for table in tables:
        for field in table.schema:
            types.setdefault(field.name, set()).add(field.type)
    mixed = [name for name, found in types.items() if len(found) > 1]

    def as_text(table: pa.Table) -> pa.Table:
        for name in mixed:
            if name in table.column_names and table.schema.field(name).type != pa.string():
                values = [json.dumps(value) for value in table.column(name).to_pylist()]
                position = table.column_names.index(name)
                table = table.set_column(position, name, pa.array(values, pa.string()))
        return table

    return pa.concat_tables([as_text(t) for t in tables], promote_options="permissive")


def shard_digest(path: str | Path) -> str:
    """``blake2b:<hex>``: a 128-bit BLAKE2b digest of the file's bytes (read in blocks).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.tar").write_bytes(b"12")
        ...     shard_digest(Path(tmp) / "a.tar")
        'blake2b:68f978fe50aca8ee91e0e1f94618c62f'
    """
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16))
    return f"blake2b:{digest.hexdigest()}"


def shard_stamp(path: str | Path) -> list[int | str]:
    """``[size, mtime_ns, digest]`` of a local shard (``digest``: :func:`shard_digest`)."""
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns, shard_digest(path)]


def shard_stamps(shards: str | Sequence[str]) -> dict[str, list[int | str]]:
    """``{path: stamp}`` (:func:`shard_stamp`) of every local shard of ``shards`` (URLs are
    left out): what an export records of its sources (``settings.source_shards``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.tar").write_bytes(b"12")
        ...     [stamp[0] for stamp in shard_stamps(f"{tmp}/a.tar").values()]
        [2]
    """
    return {
        str(Path(url).resolve()): shard_stamp(url)
        for url in expand_shards(shards, "shards")
        if not is_url(url)
    }


def same_stamp(recorded: Sequence[int | str], current: Sequence[int | str] | None) -> bool:
    """Whether a shard's ``current`` stamp (``None``: it is gone) shows the shard that
    ``recorded`` describes: the same size and content digest; for a stamp without a digest
    (an export made before digests were recorded) the same size and modification time.

    Example:
        >>> same_stamp([2, 10, "blake2b:ab"], [2, 99, "blake2b:ab"])  # only touched
        True
        >>> same_stamp([2, 10], [2, 10, "blake2b:cd"]), same_stamp([2, 10, "blake2b:ab"], None)
        (True, False)
    """
    if current is None:
        return False
    if len(recorded) < 3:
        return list(current[:2]) == list(recorded)
    return current[0] == recorded[0] and current[2] == recorded[2]


def same_sources(recorded: Mapping[str, Sequence[int | str]], current: Mapping[str, Any]) -> bool:
    """Whether two ``settings.source_shards`` name the same shards with :func:`same_stamp`."""
    return recorded.keys() == current.keys() and all(
        same_stamp(stamp, current[path]) for path, stamp in recorded.items()
    )


def check_sources(export_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Raise an :class:`ExportError` naming the first source shard of the export that is gone
    or changed (its size or content: :func:`same_stamp`) since it was exported: its rows would
    no longer match the records read from it. Exports written before shards were recorded
    pass; those written before digests were recorded are compared by size and modification
    time, with a warning saying so."""
    recorded = manifest["settings"].get("source_shards") or {}
    for path, stamp in recorded.items():
        if not same_stamp(stamp, shard_stamp(path) if os.path.isfile(path) else None):
            what = "is gone" if not os.path.exists(path) else "changed (size or content)"
            raise ExportError(
                f"the source shard {path} {what} since the export ({export_dir}/{MANIFEST}: "
                "settings.source_shards); export the shards again (mmalign export), or restore "
                "the shard"
            )
    if any(len(stamp) < 3 for stamp in recorded.values()):
        warnings.warn(
            f"the export {export_dir} records no content digest of its source shards (made by "
            "an older mmalign), so they were compared by size and modification time only: a "
            "shard rewritten with the same size and time goes unnoticed; export again to "
            "record digests",
            stacklevel=2,
        )
