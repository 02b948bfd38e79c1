"""``mmalign prep mine-negatives --embeddings EXPORT --query M1 --candidates M2 --out DIR``:
:func:`mmalign.prep.mine_negatives.mine_negatives`, hard negatives with NV-Retriever's
positive-aware filter.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "mine-negatives", "--embeddings", "emb", "--query", "image",
    ...       "--candidates", "text", "--out", "mined"])  # doctest: +SKIP
    wrote 180 records with 720 negatives (1 shards) to mined
    0
"""

from __future__ import annotations

import argparse

from mmalign.cli.common import add_reshard_arguments, fraction, positive_int

HELP = "an export's source records with hard negatives copied in"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export, the query and candidate modalities, the filter and the output shards."""
    add_reshard_arguments(parser)
    parser.add_argument("--query", required=True, help="query modality (M1)")
    parser.add_argument("--candidates", required=True, help="negatives' modality (M2)")
    parser.add_argument("--k", type=positive_int, default=4, help="negatives per record at most")
    parser.add_argument("--max-ratio", type=fraction, default=0.95, help="NV-Retriever's cap")
    parser.add_argument("--group-field", default=None, help="export metadata column: groups")


def run(args: argparse.Namespace) -> int:
    """Write the shards with mined negatives and their ``summary.json``."""
    from mmalign.prep.mine_negatives import mine_negatives

    summary = mine_negatives(
        args.embeddings,
        args.query,
        args.candidates,
        args.k,
        args.max_ratio,
        args.out,
        group_field=args.group_field,
        name=args.name,
        maxcount=args.maxcount,
    )
    print(
        f"wrote {summary['records']} records with {summary['negatives']} negatives "
        f"({len(summary['shards'])} shards) to {args.out}"
    )
    return 0
