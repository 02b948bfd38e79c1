"""``mmalign export MODEL --data SHARDS --out DIR [--dim D] [--index KIND]``: embeddings of
shards to files (resumable; ``--dim``: a renormalized prefix), plus a nearest-neighbour index
(``auto``, ``flat``, ``ivf``, ``hnsw``, ``ivfpq``, ``sq8``; :func:`mmalign.export.run_export`).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["export", "runs/digits", "--data", "data/digits/test-000000.tar",
    ...       "--out", "emb", "--index", "hnsw", "--metadata", "cls"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmalign.cli.common import (
    add_data_arguments,
    check_model,
    csv_list,
    first_process,
    output_directory,
    positive_int,
    present_fields,
    present_metadata,
)

HELP = "embeddings of shards to files, plus a nearest-neighbour index"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Data arguments, the output and chunking, then the index options."""
    add_data_arguments(parser, batch_size=256)
    parser.add_argument(
        "--out",
        type=output_directory,
        required=True,
        help="export directory (resumes if unfinished)",
    )
    parser.add_argument("--modalities", type=csv_list, help="comma-separated (default: all)")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=4096, help="rows per Parquet chunk"
    )
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument(
        "--metadata",
        type=csv_list,
        action="extend",
        default=[],
        help="record extensions to keep (comma-separated; repeatable)",
    )
    parser.add_argument(
        "--dim", type=positive_int, help="keep the first DIM coordinates, renormalized"
    )
    parser.add_argument(
        "--index",
        metavar="KIND",
        help="also build an index: auto (flat below 20k vectors, hnsw below 1M, else ivfpq) "
        "or a kind of mmalign.export.index.INDEX_KINDS (flat, ivf, hnsw, ivfpq, sq8, ...)",
    )
    parser.add_argument("--nlist", type=positive_int, help="IVF lists (default about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists searched")
    parser.add_argument("--m", type=int, default=32, help="HNSW links per node")
    parser.add_argument("--ef-search", type=positive_int, default=64, help="HNSW search beam")
    parser.add_argument(
        "--pq-m", type=positive_int, help="IVFPQ bytes per vector (default about dim/4)"
    )
    parser.add_argument(
        "--keep-items",
        type=csv_list,
        metavar="MODALITY,...",
        help="also keep these modalities' source files, to show results (mmalign serve)",
    )
    parser.add_argument(
        "--max-item-bytes",
        type=positive_int,
        default=1 << 20,
        help="largest source file kept per row (bytes; larger ones are left out)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Export (or resume), index, and print the rows, chunks, record counters and indexes."""
    from mmalign.export import run_export

    check_model(args.model, "MODEL")
    manifest = run_export(
        args.model,
        args.data,
        args.modalities,
        args.out,
        index=args.index,
        items=args.keep_items or (),
        max_item_bytes=args.max_item_bytes,
        index_options={
            "pq_m": args.pq_m,
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "m": args.m,
            "ef_search": args.ef_search,
        },
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        dim=args.dim,
        metadata_fields=present_metadata(args),
        fields=present_fields(args),
        workers=args.workers,
        progress=not args.no_progress,
    )
    if not first_process():  # one summary from a multi-process launch
        return 0
    print(
        f"exported {manifest['rows']} samples in {len(manifest['chunks'])} chunks to {args.out}"
        f" (records: {manifest['counters']})"
    )
    for index in manifest["indexes"]:
        info = json.loads(Path(index).with_suffix(".json").read_text())
        print(
            f"index: {index} ({info['kind']}, {info['rows']} x {info['dim']}, "
            f"{info['bytes']:,} bytes, {info['bytes_per_vector']:.1f} bytes/vector)"
        )
    for modality, counts in manifest["items"].items():
        print(f"items: {modality} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0
