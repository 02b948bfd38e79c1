"""``mmalign demo [--quick] [--data DIR] [--out DIR]``: build the digit data, train, evaluate,
index and write ``REPORT.md`` (:func:`mmalign.demo.pipeline.run_demo`).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["demo", "--quick", "--out", "runs/demo-quick"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse

from mmalign.cli.common import positive_int

HELP = "build the digit data, train, evaluate, index and write REPORT.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Data and output directories, scale, configs, reuse and threads."""
    parser.add_argument("--data", default="data/demo", help="demo shards (built when missing)")
    parser.add_argument("--out", default="runs/demo", help="runs, figures and REPORT.md")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and a few steps (a smoke test)"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="directory of the demo_*.yaml configs (default: the packaged mmalign/demo/configs)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --out instead of retraining"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads (default: cores - data workers)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; it prints its progress and the report's path."""
    from mmalign.demo.pipeline import run_demo

    run_demo(
        args.data,
        args.out,
        quick=args.quick,
        configs_dir=args.configs,
        reuse=args.reuse,
        threads=args.threads,
    )
    return 0
