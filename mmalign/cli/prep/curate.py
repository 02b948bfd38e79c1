"""``mmalign prep curate MODEL --data SHARDS --out DIR [--threshold T | --keep-fraction F]``:
:func:`mmalign.export.curate.curate`, the records of shards scored by a trained model, cut,
de-duplicated and written to new shards with a report (the original shards are only read).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "curate", "runs/digits", "--data", "data/digits/train-{000000..000007}.tar",
    ...       "--out", "clean", "--keep-fraction", "0.8"])  # doctest: +SKIP
    kept 4022 of 5028 records (dropped: low_score 1006); clean/curate.json, clean/scores.png
    0
"""

from __future__ import annotations

import argparse

from mmalign.cli.common import (
    add_data_arguments,
    bounded,
    csv_list,
    fields,
    first_process,
    fraction,
    output_directory,
    positive_int,
)

HELP = "shards scored by a trained model: keep the aligned records, drop near-duplicates"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and shards, the cut, the near-duplicate search, the output."""
    add_data_arguments(parser, batch_size=256)
    parser.add_argument(
        "--out",
        type=output_directory,
        required=True,
        help="directory of the new shards and report",
    )
    parser.add_argument("--modalities", type=csv_list, help="comma-separated (default: all)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument(
        "--threshold",
        type=bounded(float, -1.0, 1.0),
        help="keep records scoring at least this (a cosine: -1 to 1)",
    )
    cut.add_argument("--keep-fraction", type=fraction, help="keep this best fraction")
    parser.add_argument(
        "--missing",
        choices=["keep", "drop"],
        default="keep",
        help="records with fewer than two of the modalities (cannot be scored)",
    )
    parser.add_argument(
        "--dedup", default="", help="modality of the near-duplicate search (default: the first)"
    )
    parser.add_argument("--no-dedup", action="store_true", help="no near-duplicate search")
    parser.add_argument(
        "--dedup-threshold",
        type=bounded(float, -1, 1),
        default=0.995,
        help="cosine at or above which two records are near-duplicates",
    )
    parser.add_argument(
        "--maxcount", type=positive_int, default=10000, help="records per output shard"
    )


def run(args: argparse.Namespace) -> int:
    """Curate and print what was kept and dropped."""
    from mmalign.export.curate import curate

    report = curate(
        args.model,
        args.data,
        args.out,
        modalities=args.modalities,
        fields=fields(args.field),
        threshold=args.threshold,
        keep_fraction=args.keep_fraction,
        missing=args.missing,
        dedup=None if args.no_dedup else args.dedup,
        dedup_threshold=args.dedup_threshold,
        batch_size=args.batch_size,
        maxcount=args.maxcount,
    )
    if not first_process():  # one summary from a multi-process launch
        return 0
    dropped = ", ".join(f"{reason} {count}" for reason, count in report["dropped"].items())
    total = report["kept"] + sum(report["dropped"].values())
    print(
        f"kept {report['kept']} of {total} records (dropped: {dropped or 'none'}); "
        f"{args.out}/curate.json, {args.out}/scores.png"
    )
    return 0
