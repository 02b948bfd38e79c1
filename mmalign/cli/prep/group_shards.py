"""``mmalign prep group-shards --embeddings EXPORT --modality M --clusters K --out DIR``:
:func:`mmalign.prep.group_shards.group_shards`, neighbour batches from a finished export.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "group-shards", "--embeddings", "emb", "--modality", "image",
    ...       "--clusters", "16", "--out", "neighbours"])  # doctest: +SKIP
    wrote 180 records in 16 clusters (1 shards) to neighbours
    0
"""

from __future__ import annotations

import argparse

from mmalign.cli.common import add_reshard_arguments, count, positive_int

HELP = "an export's source records ordered by k-means cluster (neighbour batches)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export, the modality to cluster, the cluster count and the output shards."""
    add_reshard_arguments(parser)
    parser.add_argument("--modality", required=True, help="the exported modality to cluster")
    parser.add_argument("--clusters", type=positive_int, required=True, help="k-means clusters")
    parser.add_argument("--seed", type=count, default=0, help="k-means and cluster order seed")


def run(args: argparse.Namespace) -> int:
    """Write the neighbour-ordered shards and their ``summary.json``."""
    from mmalign.prep.group_shards import group_shards

    summary = group_shards(
        args.embeddings,
        args.modality,
        args.clusters,
        args.out,
        name=args.name,
        maxcount=args.maxcount,
        seed=args.seed,
    )
    print(
        f"wrote {summary['records']} records in {summary['clusters']} clusters "
        f"({len(summary['shards'])} shards) to {args.out}"
    )
    return 0
