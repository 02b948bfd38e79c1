"""Shards rewritten from a finished export: its rows' embeddings, and the source records they
came from (``settings.shards``, read again in order) written out in a new order or with extra
files. :mod:`~mmalign.prep.group_shards` and :mod:`~mmalign.prep.mine_negatives` use it.

The source records are held in memory while the new shards are written (their payloads, not
decoded), so run it on a part of a very large set at a time.

Example:
    >>> rows = ExportRows.load("emb", "image")  # doctest: +SKIP
    >>> records = source_records("emb", rows.keys)  # doctest: +SKIP
    >>> write_shards((records[key] for key in rows.keys), "out", "data")  # doctest: +SKIP
    ['data-000000.tar']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mmalign.data.exports import ExportError, check_sources, load_embeddings, read_manifest
from mmalign.data.records import log_skip, read_shards, unsafe_key
from mmalign.data.shard_writer import ShardWriter
from mmalign.data.shards import expand_shards
from mmalign.data.views import group_id
from mmalign.errors import UserError
from mmalign.files import clear_old_shards, refuse_links, write_json
from mmalign.output_owner import Output, claim_output, record_output
from mmalign.progress import progress_bar


@dataclass
class ExportRows:
    """One modality of an export: ``vectors`` ``[N, d]`` float32, ``keys``, ``present``."""

    vectors: np.ndarray
    keys: list[str]
    present: np.ndarray
    table: pa.Table

    @classmethod
    def load(cls, export_dir: str | Path, modality: str) -> ExportRows:
        """The rows of ``modality``; duplicate keys are an error (records are found by key)."""
        vectors, table = load_embeddings(export_dir, modality)
        keys = [str(key) for key in table.column("key").to_pylist()]
        if len(set(keys)) != len(keys):
            raise ExportError(
                f"{export_dir} holds duplicate record keys; give the source records unique "
                "keys (mmalign prep from-manifest --key-column) and export again"
            )
        present = ~np.isnan(vectors).any(axis=1)
        return cls(np.nan_to_num(vectors).astype(np.float32), keys, present, table)

    def groups(self, field: str | None) -> np.ndarray:
        """Each row's group (``data.group_field`` rules) from a metadata column of the export;
        without ``field`` every row is its own group."""
        if field is None:
            return np.arange(len(self.keys), dtype=np.int64)
        if field not in self.table.column_names:
            raise ExportError(
                f"the export has no metadata column {field!r} (--group-field); columns: "
                f"{self.table.column_names}; export with --metadata {field}"
            )
        values = self.table.column(field).to_pylist()
        return np.array([group_id(value) for value in values], dtype=np.int64)


def source_records(export_dir: str | Path, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The raw records (payload bytes by extension) of ``keys`` from the export's source
    shards; an unreadable record, or one whose key cannot name a tar member
    (:func:`unsafe_key`), is logged and left out. A source shard changed since the export, or
    an exported key no longer in the shards, is an :class:`ExportError`."""
    manifest = read_manifest(export_dir)
    check_sources(export_dir, manifest)
    wanted = set(keys)
    records = {}
    refused = set()
    urls = source_shards(export_dir)
    raws = read_shards({"url": url} for url in urls)
    for raw in progress_bar(raws, desc=f"read {len(urls)} source shards", unit="record"):
        key = raw["__key__"]
        problem = unsafe_key(key)
        if "__error__" in raw:
            log_skip(raw["__url__"], key, *raw["__error__"])
        elif problem is not None:
            log_skip(raw["__url__"], key, "unsafe_key", f"{problem}; not written to a new shard")
            refused.add(key)
        elif key in wanted:
            records[key] = {name: value for name, value in raw.items() if name != "__url__"}
    missing = [key for key in keys if key not in records and key not in refused]
    if missing:
        raise ExportError(
            f"{len(missing)} of the {len(keys)} exported records (first: {missing[0]!r}) are "
            f"no longer in the source shards of {export_dir} (settings.shards); the shards "
            "changed since the export: export them again (mmalign export)"
        )
    return records


def source_shards(export_dir: str | Path) -> list[str]:
    """The shards the export at ``export_dir`` was made from (its ``settings.shards``)."""
    return expand_shards(read_manifest(export_dir)["settings"]["shards"], "settings.shards")


def record_extensions(export_dir: str | Path, modality: str) -> str:
    """The record extension(s) ``modality`` was read from in the export (``"jpg;png"``)."""
    settings = read_manifest(export_dir)["settings"]
    recorded = settings.get("extensions") or settings.get("fields") or {}
    if modality not in recorded:
        raise ExportError(
            f"{export_dir} does not record the file extension of {modality!r} (an export made "
            "before extensions were recorded, without --field); export again, or with "
            f"--field {modality}=EXT"
        )
    return str(recorded[modality])


def find_payload(record: dict[str, Any], extensions: str) -> tuple[str, bytes] | None:
    """The first of ``extensions`` (``"jpg;png"``) a raw record has, with its bytes."""
    for extension in extensions.split(";"):
        extension = extension.strip().lstrip(".").lower()
        if extension in record:
            return extension, record[extension]
    return None


def check_maxcount(maxcount: int) -> None:
    """Refuse a shard size below one record (``--maxcount``) before any work is done."""
    if maxcount < 1:
        raise UserError(
            f"records per shard must be >= 1 (--maxcount), got {maxcount}; pass a positive count"
        )


def prep_output(command: str, name: str) -> Output:
    """The owner of the output folder of ``prep COMMAND`` (:mod:`mmalign.output_owner`): the
    ``NAME-*.tar`` shards it writes (also in ``train/`` and ``val/``) may differ from its
    record after a failed run; its ``summary.json`` is checked against the record."""
    patterns = (f"{name}-*.tar", f"train/{name}-*.tar", f"val/{name}-*.tar")
    return Output(f"prep {command}", "--out", patterns)


def write_shards(
    records: Iterable[dict[str, Any]],
    out: str | Path,
    owner: Output,
    name: str,
    maxcount: int = 10000,
    total: int | None = None,
    sources: Sequence[str] = (),
) -> list[str]:
    """Write records (``total`` of them, for the progress bar's ETA) in the given order to
    ``out/NAME-000000.tar`` ...; returns the names. ``out`` must be new, empty or an earlier
    output of ``owner`` (whose shards are replaced) and hold none of the ``sources`` being
    read (:func:`~mmalign.output_owner.claim_output`)."""
    check_maxcount(maxcount)
    out = claim_output(out, owner, sources)
    refuse_links(out, "output directory", "--out")  # no shard or summary through a link
    clear_old_shards(out, name)
    with ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
        for record in progress_bar(records, total=total, desc=f"write {out}", unit="record"):
            writer.write(record)
    return sorted(path.name for path in out.glob(f"{name}-*.tar"))


def write_summary(out: str | Path, summary: dict[str, Any], owner: Output) -> dict[str, Any]:
    """Write ``summary`` as ``OUT/summary.json`` beside the new shards and record ``owner``'s
    files; returns it."""
    write_json(Path(out) / "summary.json", summary, indent=1, sort_keys=False)
    record_output(Path(out), owner)
    return summary
