"""The source items of an export (the image, clip or text of each row), kept so that a
search result can be shown: ``OUT/items/{modality}.parquet`` holds, per exported row, its
``key``, the record ``extension`` and the file's bytes (``data``; null where the record had
no such file or the file is over ``max_bytes``).

:func:`keep_items` reads the export's shards once more (the same record limits as training)
and copies the files of the chosen modalities; :func:`load_items` reads them back as a
key -> (extension, bytes) lookup (what ``mmalign serve`` answers item requests from, so only
keys of the export are ever served).

Example:
    >>> keep_items("emb", "runs/digits", ["image"])  # doctest: +SKIP
    {'image': {'kept': 180, 'over_cap': 0, 'missing': 0}}
    >>> load_items("emb", "image")["test-000017"][0]  # doctest: +SKIP
    'png'
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.config.extensions import parse_alternatives
from mmalign.data.decode import find_file
from mmalign.data.exports import load_metadata, read_manifest
from mmalign.data.records import read_shards
from mmalign.data.shards import expand_shards
from mmalign.eval.loading import load_model, resolve_fields
from mmalign.files import atomic_write

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

ITEMS_DIR = "items"
"""The folder of an export directory holding the kept items."""
MAX_ITEM_BYTES = 1 << 20
"""Default cap on one kept file (1 MiB): a photo or a short clip; larger files are left out."""


def _item_columns(
    shards: Any, extensions: dict[str, tuple[str, ...]], max_bytes: int
) -> tuple[dict[str, dict[str, tuple[str, bytes]]], dict[str, int]]:
    """Per modality key -> (extension, bytes) of the files at most ``max_bytes``; the number
    left out for their size."""
    found: dict[str, dict[str, tuple[str, bytes]]] = {name: {} for name in extensions}
    over = dict.fromkeys(extensions, 0)
    urls = expand_shards(shards, "settings.shards")
    for record in read_shards({"url": url} for url in urls):
        for name, alternatives in extensions.items():
            extension = find_file(record, alternatives)
            data = record.get(extension) if extension else None
            if not isinstance(data, bytes):
                continue
            if len(data) > max_bytes:
                over[name] += 1
            else:
                found[name][record["__key__"]] = (extension or "", data)
    return found, over


def keep_items(
    out_dir: str | Path,
    model: AlignmentModel | str | Path | None,
    modalities: Sequence[str],
    max_bytes: int = MAX_ITEM_BYTES,
) -> dict[str, dict[str, int]]:
    """Copy the source file of each exported row of ``modalities`` (at most ``max_bytes``
    each) into ``OUT/items/{modality}.parquet``; returns per modality the counts ``kept``,
    ``over_cap`` and ``missing``. ``model`` resolves the record extensions as the export did
    (``None``: the model the export recorded).

    Example:
        >>> counts = keep_items("emb", None, ["image", "text"], max_bytes=2**16)  # doctest: +SKIP
        >>> counts["text"]["kept"]  # doctest: +SKIP
        180
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes (--max-item-bytes) must be >= 1, got {max_bytes}")
    out_dir = Path(out_dir)
    settings = read_manifest(out_dir)["settings"]
    loaded = load_model(model if model is not None else settings["model_path"])
    fields = resolve_fields(loaded, modalities, settings["fields"], settings["model_path"])
    extensions = {name: parse_alternatives(spec) for name, spec in fields.items()}
    found, over = _item_columns(settings["shards"], extensions, max_bytes)
    keys = load_metadata(out_dir).column("key").to_pylist()
    counts = {}
    for name, items in found.items():
        rows = [items.get(key) for key in keys]
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "extension": pa.array([row[0] if row else None for row in rows], pa.string()),
                "data": pa.array([row[1] if row else None for row in rows], pa.binary()),
            }
        )
        path = out_dir / ITEMS_DIR / f"{name}.parquet"
        atomic_write(path, functools.partial(pq.write_table, table))
        kept = sum(row is not None for row in rows)
        counts[name] = {"kept": kept, "over_cap": over[name], "missing": len(keys) - kept}
    return counts


def kept_modalities(out_dir: str | Path) -> list[str]:
    """Modalities whose items an export kept.

    Example:
        >>> kept_modalities("emb")  # doctest: +SKIP
        ['image', 'text']
    """
    return sorted(path.stem for path in (Path(out_dir) / ITEMS_DIR).glob("*.parquet"))


def load_items(out_dir: str | Path, modality: str) -> dict[str, tuple[str, bytes]]:
    """Key -> (extension, bytes) of the kept items of one modality (rows without one left
    out).

    Example:
        >>> load_items("emb", "text")["test-000017"]  # doctest: +SKIP
        ('txt', b'the digit seven')
    """
    table = pq.read_table(Path(out_dir) / ITEMS_DIR / f"{modality}.parquet")
    columns = [table.column(name).to_pylist() for name in ("key", "extension", "data")]
    return {key: (ext, data) for key, ext, data in zip(*columns) if data is not None}
