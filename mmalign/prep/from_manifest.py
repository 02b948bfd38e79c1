"""Turn a CSV or JSONL manifest into WebDataset shards.

    mmalign prep from-manifest pairs.csv --out shards/ \\
        --fields image=png,caption=txt,audio=flac,labs=npy,label=cls [--maxcount 10000] \\
        [--maxsize 1e9] [--key-column key] [--name data]

Each manifest row becomes one record ``{key}.{extension}`` per column listed in ``--fields``
(default: every column but the key, named by its extension). A cell is either a file path,
relative to the manifest (its bytes are stored as they are, after checking that they decode),
or an inline value: text for ``txt``, an integer for ``cls``, a JSON object (or its text in a
CSV) for ``json``/``graph.json``, a list of numbers for ``npy``. Images, audio and ``npz``
must be files. An empty cell leaves that modality out of the record. Rows with missing or
unreadable files, bad inline values or duplicate keys are reported and left out.
``DIR/summary.json`` records what was written.

Example:
    >>> main(["pairs.jsonl", "--out", "shards", "--fields", "image=png,text=txt"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm
from webdataset.autodecode import IMAGE_EXTENSIONS
from webdataset.writer import default_handlers, encode_based_on_extension1

from mmalign.data.decode import AUDIO_EXTENSIONS, RecordError, decode_value
from mmalign.errors import ConfigError

FILE_ONLY = {*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS, "npz"}
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
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ConfigError(
                        f"not a JSON object: {error} ({path}:{number}); fix or delete the line"
                    ) from None
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ConfigError(f"manifest {path}: unknown format (MANIFEST); use .csv, .tsv or .jsonl")
    if not rows:
        raise ConfigError(
            f"manifest has no rows ({path}); write a header line, then one row per record "
            "(e.g. key,image,caption)"
        )
    return rows


def parse_field_map(text: str) -> dict[str, str]:
    """``"image=png,text=txt"`` -> ``{"image": "png", "text": "txt"}``.

    Example:
        >>> parse_field_map("image=png, graph=graph.json")
        {'image': 'png', 'graph': 'graph.json'}
    """
    fields = {}
    for item in text.split(","):
        column, sep, extension = item.partition("=")
        if not sep or not column.strip() or not extension.strip():
            raise ValueError(f"--fields entry {item!r} must look like column=extension")
        fields[column.strip()] = extension.strip().lstrip(".").lower()
    return fields


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


def encode_cell(value: Any, extension: str, base_dir: Path) -> bytes | None:
    """One manifest cell as record content (None: modality absent); raises :class:`RowError`."""
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
    if extension in FILE_ONLY:
        raise RowError("missing_file", f"{value}: no such file (relative to {base_dir})")
    try:
        content = _inline(value, extension)
        encoded = encode_based_on_extension1(content, extension, default_handlers)
        decode_value(extension, encoded)
    except (ValueError, TypeError) as error:
        raise RowError(f"bad_value/{extension}", f"{str(value)[:60]!r}: {error}") from None
    return encoded


def row_to_record(
    row: Mapping[str, Any], key: str, fields: Mapping[str, str], base_dir: Path
) -> dict[str, Any]:
    """A manifest row as a record ``{"__key__": key, extension: bytes, ...}``."""
    if "." in key or "/" in key or not key:
        raise RowError("bad_key", f"key {key!r} must be non-empty without '.' or '/'")
    record: dict[str, Any] = {"__key__": key}
    for column, extension in fields.items():
        content = encode_cell(row.get(column), extension, base_dir)
        if content is not None:
            record[extension] = content
    if len(record) == 1:
        raise RowError("empty_row", "no value in any of the --fields columns")
    return record


def _check_columns(rows: list[dict[str, Any]], fields: Mapping[str, str], path: Path) -> None:
    columns = {column for row in rows for column in row}
    missing = [column for column in fields if column not in columns]
    if missing:
        raise ValueError(
            f"{path}: columns {missing} (from --fields) are not in the manifest; "
            f"its columns are {sorted(columns)}"
        )


def convert(
    manifest: Path,
    out: Path,
    fields: Mapping[str, str] | None = None,
    *,
    key_column: str = "key",
    name: str = "data",
    maxcount: int = 10000,
    maxsize: float = 1e9,
) -> dict[str, Any]:
    """Write the shards of a manifest and ``out/summary.json``; returns the summary."""
    rows = read_manifest(manifest)
    if fields is None:
        fields = {column: column.lower() for row in rows for column in row if column != key_column}
    _check_columns(rows, fields, manifest)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{name}-*.tar"):
        stale.unlink()
    per_modality: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples, seen_keys = [], set()
    pattern = str(out / f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for index, row in enumerate(tqdm(rows, desc=f"{manifest.name} -> {out}", unit="row")):
            key = str(row.get(key_column) or f"{index:09d}")
            try:
                if key in seen_keys:
                    raise RowError("duplicate_key", f"key {key!r} appeared in an earlier row")
                record = row_to_record(row, key, fields, manifest.parent)
            except RowError as error:
                reasons[error.reason] += 1
                if len(examples) < MAX_EXAMPLES:
                    example = {"row": index, "key": key, "reason": error.reason}
                    examples.append({**example, "error": str(error)})
                continue
            seen_keys.add(key)
            writer.write(record)
            per_modality.update(column for column, ext in fields.items() if ext in record)
    summary = {
        "manifest": str(manifest),
        "fields": dict(fields),
        "records": len(seen_keys),
        "shards": sorted(path.name for path in out.glob(f"{name}-*.tar")),
        "per_modality": {column: per_modality[column] for column in fields},
        "skipped": {"rows": sum(reasons.values()), "reasons": dict(reasons), "examples": examples},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _report(summary: dict[str, Any], out: Path) -> None:
    print(f"wrote {summary['records']} records in {len(summary['shards'])} shards to {out}")
    skipped = summary["skipped"]
    if skipped["rows"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped["reasons"].items())
        print(f"left out {skipped['rows']} rows ({reasons}); first ones:")
        for example in skipped["examples"]:
            print(f"  row {example['row']} (key {example['key']}): {example['error']}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``mmalign prep from-manifest ...``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="mmalign prep from-manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path, help="a .csv, .tsv or .jsonl file")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--fields", type=parse_field_map, default=None, help="column=extension,...")
    parser.add_argument("--maxcount", type=int, default=10000, help="records per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--key-column", default="key", help="column with record keys")
    parser.add_argument("--name", default="data", help="shard names: NAME-000000.tar, ...")
    args = parser.parse_args(argv)
    summary = convert(
        args.manifest,
        args.out,
        args.fields,
        key_column=args.key_column,
        name=args.name,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
    )
    _report(summary, args.out)
    return 0 if summary["records"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
