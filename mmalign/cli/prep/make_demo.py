"""``mmalign prep make-demo --out DIR [--seed 0] [--variants 4] [--limit N] [--force]
[--no-progress]``:
:func:`mmalign.demo.data.make_demo`, the ``digits`` and ``digits-sum`` demo shards.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "make-demo", "--out", "data", "--limit", "100"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse

from mmalign.cli.common import bounded, count, output_directory

HELP = "the digit demo's shards (digits, digits-sum) from scikit-learn's bundled digits"
MIN_LIMIT = 10
"""The smallest ``--limit``: one source image per class."""
MAX_VARIANTS = 100
"""The largest ``--variants``: ~180k records (~4 GB, ~30 min on one core) per dataset."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--seed``, ``--variants``, ``--limit``, ``--force`` and ``--no-progress``."""
    parser.add_argument("--out", type=output_directory, required=True, help="output directory")
    parser.add_argument("--seed", type=count, default=0, help="split and variation seed")
    parser.add_argument(
        "--variants",
        type=bounded(int, 1, MAX_VARIANTS),
        default=4,
        help=f"records per source image, 1 to {MAX_VARIANTS} (each adds ~1.8k records and "
        "~40 MB per dataset; 4: ~5k train records)",
    )
    parser.add_argument(
        "--limit",
        type=bounded(int, MIN_LIMIT),
        default=None,
        help=f"at most N (>= {MIN_LIMIT}: one per class) source images per split (quick runs)",
    )
    parser.add_argument("--force", action="store_true", help="rewrite complete output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the demo datasets (a complete one with the same settings is left as it is)."""
    from mmalign.demo.data import make_demo

    make_demo(
        args.out,
        seed=args.seed,
        variants=args.variants,
        limit=args.limit,
        force=args.force,
        progress=not args.no_progress,
    )
    return 0
