"""Turn a CSV or JSONL manifest into WebDataset shards.

    mmalign prep from-manifest pairs.csv --out shards/ \\
        [--fields image=png,caption=txt,audio=flac,labs=npy,label=cls] [--maxcount 10000] \\
        [--vector labs.npy=age,glucose] [--val-fraction 0.1] \\
        [--maxsize 1e9] [--key-column key] [--name data]

Each manifest row becomes one record ``{key}.{extension}`` per column listed in ``--fields``.
Without ``--fields``, every column but the key is taken and its extension inferred from its
values (:mod:`mmalign.prep.columns`: file suffixes, integers as ``cls``, lists as ``npy``,
else ``txt``); a column whose cells name files is a file column. A cell is either a file path,
relative to the manifest (its bytes are stored as they are, after checking that they decode),
or an inline value: text for ``txt``, an integer for ``cls``, a JSON object (or its text in a
CSV) for ``json``/``graph.json``, a list of numbers for ``npy``. Images, audio and ``npz``
(and every cell of an inferred file column) must be files. ``--vector EXT=col,col,...`` packs
numeric columns into one float vector (an empty cell is NaN, a missing value). An empty cell
leaves that modality out of the record. Rows with missing or unreadable files, bad inline
values, duplicate keys or keys no tool may write (:func:`~mmalign.data.records.unsafe_key`:
absolute, a ``..`` part, a backslash or NUL; or a ``.`` or ``/``) are reported and left out.

Shards are ``DIR/NAME-000000.tar``, ...; with ``--val-fraction F`` about a fraction F of the
rows (chosen by a hash of the key, so a row keeps its split when rows are added) go to
``DIR/val/`` and the others to ``DIR/train/`` (point ``data.train`` / ``data.val`` at those
directories). ``DIR/summary.json`` records what was written.

Example:
    >>> convert("pairs.jsonl", "shards", {"image": "png", "text": "txt"})["records"]
    ... # doctest: +SKIP
    5
"""

from __future__ import annotations

import contextlib
import csv
import json
import zlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.autodecode import IMAGE_EXTENSIONS
from webdataset.writer import default_handlers, encode_based_on_extension1

from mmalign.data.decode import AUDIO_EXTENSIONS, RecordError, decode_value
from mmalign.data.records import unsafe_key
from mmalign.data.shard_writer import ShardWriter
from mmalign.data.video import VIDEO_EXTENSIONS
from mmalign.errors import ConfigError
from mmalign.files import clear_old_shards, refuse_links
from mmalign.output_owner import claim_output
from mmalign.prep.columns import infer_fields, pack_vector
from mmalign.prep.reshard import prep_output, write_summary
from mmalign.progress import progress_bar

FILE_ONLY = {*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS, *VIDEO_EXTENSIONS, "npz", "csv"}
MAX_EXAMPLES = 10


class RowError(ValueError):
    """A manifest row that cannot become a record; ``reason`` groups the report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv``/``.tsv`` (header line) or ``.jsonl`` (one object per line) manifest;
    a directory, an unknown format, a bad line or a manifest without rows is a
    :class:`~mmalign.errors.ConfigError` naming the file."""
    if path.is_dir():
        raise ConfigError(f"manifest {path} is a directory (MANIFEST); pass the manifest file")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        rows = _manifest_rows(path, path.suffix.lower())
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"manifest {path} is not UTF-8 text (byte {error.start}) (MANIFEST); save it as "
            "UTF-8 CSV, TSV or JSON lines"
        ) from None
    if not rows:
        raise ConfigError(
            f"manifest has no rows ({path}); write a header line, then one row per record "
            "(e.g. key,image,caption)"
        )
    return rows


def _manifest_rows(path: Path, suffix: str) -> list[Any]:
    """The rows of the manifest ``path`` read by its ``suffix`` (see :func:`read_manifest`)."""
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    row = error
                if not isinstance(row, dict):
                    got = row if isinstance(row, ValueError) else f"a {type(row).__name__}"
                    raise ConfigError(
                        f"not a JSON object: {got} ({path}:{number}); fix or delete the line"
                    )
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    raise ConfigError(f"manifest {path}: unknown format (MANIFEST); use .csv, .tsv or .jsonl")


def _inline(value: Any, extension: str) -> Any:
    """An inline cell as something webdataset's writer encodes for ``extension``."""
    last = extension.rsplit(".", 1)[-1]
    parsed = json.loads(value) if isinstance(value, str) and last in ("json", "npy") else value
    if last == "npy":
        return np.asarray(parsed, dtype=np.float32)
    if last == "cls":
        return int(value)
    if last == "json":
        return parsed
    return str(value)


def _existing_file(base_dir: Path, value: Any) -> Path | None:
    if not isinstance(value, str):
        return None
    try:
        path = base_dir / value
        return path if path.is_file() else None
    except OSError:  # e.g. a long caption is no file name
        return None


def encode_cell(
    value: Any, extension: str, base_dir: Path, must_be_file: bool = False
) -> bytes | None:
    """One manifest cell as record content (None: modality absent); raises :class:`RowError`.

    ``must_be_file``: the cell names a file whatever the extension (an inferred file column).
    """
    if value is None or value == "":
        return None
    path = _existing_file(base_dir, value)
    if path is not None:
        data = path.read_bytes()
        try:
            decode_value(extension, data)
        except RecordError as error:
            raise RowError(f"unreadable_file/{error.reason}", f"{value}: {error}") from None
        return data
    if must_be_file or extension in FILE_ONLY:
        raise RowError("missing_file", f"{value}: no such file (relative to {base_dir})")
    try:
        content = _inline(value, extension)
        encoded = encode_based_on_extension1(content, extension, default_handlers)
        decode_value(extension, encoded)
    except (ValueError, TypeError) as error:
        raise RowError(f"bad_value/{extension}", f"{str(value)[:60]!r}: {error}") from None
    return encoded


def row_to_record(
    row: Mapping[str, Any],
    key: str,
    fields: Mapping[str, str],
    base_dir: Path,
    file_columns: Collection[str] = (),
    vectors: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """A manifest row as a record ``{"__key__": key, extension: bytes, ...}``; ``vectors``
    maps an extension to the numeric columns packed into it."""
    problem = unsafe_key(key)  # the rule of every tool that writes record keys
    if problem is not None:
        raise RowError("bad_key", problem)
    if "." in key or "/" in key:
        raise RowError("bad_key", f"key {key!r} holds a '.' or a '/' (a key names one record)")
    record: dict[str, Any] = {"__key__": key}
    for column, extension in fields.items():
        content = encode_cell(row.get(column), extension, base_dir, column in file_columns)
        if content is not None:
            record[extension] = content
    for extension, columns in (vectors or {}).items():
        try:
            vector = pack_vector(row, columns)
        except ValueError as error:
            raise RowError(f"bad_value/{extension}", str(error)) from None
        if vector is not None:
            record[extension] = encode_cell(vector, extension, base_dir)
    if len(record) == 1:
        raise RowError("empty_row", "no value in any of the --fields columns")
    return record


def _check_columns(
    rows: list[dict[str, Any]], wanted: Collection[str], path: Path, option: str
) -> None:
    columns = {column for row in rows for column in row}
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise ValueError(
            f"{path}: columns {missing} (from {option}) are not in the manifest; "
            f"its columns are {sorted(columns)}"
        )


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of the keys (by a CRC32 hash), else ``"train"``.

    Example:
        >>> split_of("0001", 0.0), split_of("0001", 1.0)
        ('train', 'val')
    """
    return "val" if zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000 else "train"


def convert(
    manifest: Path,
    out: Path,
    fields: Mapping[str, str] | None = None,
    *,
    key_column: str = "key",
    name: str = "data",
    maxcount: int = 10000,
    maxsize: float = 1e9,
    vectors: Mapping[str, Sequence[str]] | None = None,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Write the shards of a manifest and ``out/summary.json``; returns the summary.

    ``fields=None`` infers every other column's extension from its values; ``vectors``
    packs numeric columns into one ``npy`` vector per extension; ``val_fraction > 0`` writes
    the shards into ``out/train/`` and ``out/val/`` (each ``NAME-000000.tar``, ...).
    """
    rows = read_manifest(manifest)
    vectors = dict(vectors or {})
    packed = [column for columns in vectors.values() for column in columns]
    _check_columns(rows, packed, manifest, "--vector")
    inferred = fields is None
    file_columns: set[str] = set()
    if fields is None:
        fields, file_columns = infer_fields(rows, key_column, skip=packed)
    _check_columns(rows, fields, manifest, "--fields")
    owner = prep_output("from-manifest", name)
    claim_output(out, owner, [manifest])
    refuse_links(out, "output directory", "--out")  # no shard or summary through a link
    directories = {"train": out / "train", "val": out / "val"} if val_fraction > 0 else {"": out}
    for directory in directories.values():
        directory.mkdir(parents=True, exist_ok=True)
        clear_old_shards(directory, name)
    per_modality: Counter[str] = Counter()
    per_split: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    with contextlib.ExitStack() as stack:  # a failure removes the shards written
        writers = {
            split: stack.enter_context(
                ShardWriter(
                    str(directory / f"{name}-%06d.tar"),
                    maxcount=maxcount,
                    maxsize=maxsize,
                    verbose=0,
                )
            )
            for split, directory in directories.items()
        }
        bar = progress_bar(rows, desc=f"{manifest.name} -> {out}", unit="row")
        for index, row in enumerate(bar):
            key = str(row.get(key_column) or f"{index:09d}")
            try:
                if key in seen_keys:
                    raise RowError("duplicate_key", f"key {key!r} appeared in an earlier row")
                record = row_to_record(row, key, fields, manifest.parent, file_columns, vectors)
            except RowError as error:
                reasons[error.reason] += 1
                if len(examples) < MAX_EXAMPLES:
                    example = {"row": index, "key": key, "reason": error.reason}
                    examples.append({**example, "error": str(error)})
                continue
            seen_keys.add(key)
            split = split_of(key, val_fraction) if val_fraction > 0 else ""
            writers[split].write(record)
            per_split[split] += 1
            per_modality.update(column for column, ext in fields.items() if ext in record)
            per_modality.update(ext for ext in vectors if ext in record)
    summary = {
        "manifest": str(manifest),
        "fields": dict(fields),
        "fields_inferred": inferred,
        "file_columns": sorted(file_columns),
        "vectors": vectors,
        "records": len(seen_keys),
        "splits": {split or name: per_split[split] for split in directories},
        "shards": sorted(
            str(path.relative_to(out))
            for directory in directories.values()
            for path in directory.glob(f"{name}-*.tar")
        ),
        "per_modality": {column: per_modality[column] for column in [*fields, *vectors]},
        "skipped": {"rows": sum(reasons.values()), "reasons": dict(reasons), "examples": examples},
    }
    return write_summary(out, summary, owner)
