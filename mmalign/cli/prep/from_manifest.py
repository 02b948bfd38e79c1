"""``mmalign prep from-manifest MANIFEST --out DIR [--fields COL=EXT,...] ...``:
:func:`mmalign.prep.from_manifest.convert`, a CSV/TSV/JSONL manifest to WebDataset shards,
and the report of what was written and left out.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "from-manifest", "pairs.jsonl", "--out", "shards",
    ...       "--fields", "image=png,text=txt"])  # doctest: +SKIP
    wrote 5 records (data 5) in 1 shards to shards
    0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmalign.cli.common import bounded, output_directory, positive_int

HELP = "shards from a CSV/TSV/JSONL manifest of files and inline values"


def field_map(text: str) -> dict[str, str]:
    """``--fields`` values: ``"image=png,text=txt"`` -> ``{"image": "png", "text": "txt"}``
    (an argparse ``type``).

    Example:
        >>> field_map("image=png, graph=graph.json")
        {'image': 'png', 'graph': 'graph.json'}
    """
    fields = {}
    for item in text.split(","):
        column, sep, extension = item.partition("=")
        if not sep or not column.strip() or not extension.strip():
            raise argparse.ArgumentTypeError(f"entry {item!r} must look like column=extension")
        fields[column.strip()] = extension.strip().lstrip(".").lower()
    return fields


def vector_columns(text: str) -> tuple[str, list[str]]:
    """``--vector`` values: ``"labs.npy=age,bp"`` -> ``("labs.npy", ["age", "bp"])`` (an
    argparse ``type``).

    Example:
        >>> vector_columns("labs.npy=age, glucose")
        ('labs.npy', ['age', 'glucose'])
    """
    extension, sep, columns = text.partition("=")
    names = [name.strip() for name in columns.split(",") if name.strip()]
    extension = extension.strip().lstrip(".").lower()
    if not sep or not names or not extension.endswith("npy"):
        raise argparse.ArgumentTypeError(
            f"{text!r} must look like EXT=column,column,... with EXT ending in npy; write e.g. "
            "labs.npy=age,glucose"
        )
    return extension, names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The manifest, ``--out``, the fields and vectors, shard sizes and the validation split."""
    parser.add_argument("manifest", type=Path, help="a .csv, .tsv or .jsonl file")
    parser.add_argument("--out", type=output_directory, required=True, help="output directory")
    parser.add_argument(
        "--fields",
        type=field_map,
        default=None,
        help="column=extension,... (default: every column, inferred from its values)",
    )
    parser.add_argument(
        "--maxcount", type=positive_int, default=10000, help="records per shard at most"
    )
    parser.add_argument(
        "--maxsize",
        type=bounded(float, 0, open_low=True),
        default=1e9,
        help="bytes per shard at most",
    )
    parser.add_argument("--key-column", default="key", help="column with record keys")
    parser.add_argument("--name", default="data", help="shard names: NAME-000000.tar, ...")
    parser.add_argument(
        "--vector",
        action="append",
        type=vector_columns,
        default=[],
        metavar="EXT=COL,COL,...",
        help="pack numeric columns into one vector (empty cell: NaN); repeatable",
    )
    parser.add_argument(
        "--val-fraction",
        type=bounded(float, 0, 1, open_high=True),
        default=0.0,
        help="hold out about this fraction of rows in OUT/val/ (the rest: OUT/train/)",
    )


def report(summary: dict[str, Any], out: Path) -> None:
    """Print the inferred fields, the records per split and the rows left out."""
    if summary["fields_inferred"] and summary["fields"]:  # none with only --vector columns
        shown = ", ".join(
            f"{column}={extension}" + (" (files)" if column in summary["file_columns"] else "")
            for column, extension in summary["fields"].items()
        )
        print(f"fields inferred from the values: {shown}; pass --fields to choose")
    splits = ", ".join(f"{split} {count}" for split, count in summary["splits"].items())
    print(
        f"wrote {summary['records']} records ({splits}) in {len(summary['shards'])} shards to {out}"
    )
    skipped = summary["skipped"]
    if skipped["rows"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped["reasons"].items())
        print(f"left out {skipped['rows']} rows ({reasons}); first ones:")
        for example in skipped["examples"]:
            print(f"  row {example['row']} (key {example['key']}): {example['error']}")


def run(args: argparse.Namespace) -> int:
    """Write the shards and ``summary.json``, print the report; status 1 when no row became
    a record."""
    from mmalign.prep.from_manifest import convert

    summary = convert(
        args.manifest,
        args.out,
        args.fields,
        key_column=args.key_column,
        name=args.name,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        vectors=dict(args.vector),
        val_fraction=args.val_fraction,
    )
    report(summary, args.out)
    return 0 if summary["records"] else 1
