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

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
            f"{out_dir} holds no finished export ({MANIFEST} missing or incomplete); run "
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
    chunks = manifest["chunks"]
    vectors = [np.load(out_dir / chunk["files"][modality]) for chunk in chunks]
    tables = [pq.read_table(out_dir / chunk["files"]["meta"]) for chunk in chunks]
    dim = manifest["settings"]["dim"]
    array = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return array, table
