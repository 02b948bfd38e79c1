"""``mmalign prep TOOL ...``: the data preparation tools, one module each (``HELP``,
``add_arguments(parser)``, ``run(args)``, as the subcommands of :mod:`mmalign.cli.main`);
``mmalign prep --help`` lists them and ``mmalign prep TOOL --help`` shows a tool's options.

Example:
    >>> from mmalign.cli.main import build_parser
    >>> build_parser().parse_args(["prep", "make-demo", "--out", "data"]).tool
    'make-demo'
"""

from __future__ import annotations

import argparse
from types import ModuleType

from mmalign.cli.common import add_subcommands
from mmalign.cli.prep import (
    curate,
    from_manifest,
    group_shards,
    make_demo,
    mine_negatives,
    train_tokenizer,
)

HELP = (
    "write WebDataset shards (demo data, manifests, neighbours, hard negatives, curated) "
    "or a tokenizer"
)
TOOLS: dict[str, ModuleType] = {
    "make-demo": make_demo,
    "from-manifest": from_manifest,
    "train-tokenizer": train_tokenizer,
    "group-shards": group_shards,
    "mine-negatives": mine_negatives,
    "curate": curate,
}
"""Each ``mmalign prep`` tool and its module."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-subcommand per tool, with the tool's own options."""
    add_subcommands(parser, TOOLS, dest="tool", metavar="TOOL")


def run(args: argparse.Namespace) -> int:
    """Run the chosen tool; returns its exit status."""
    return TOOLS[args.tool].run(args)
