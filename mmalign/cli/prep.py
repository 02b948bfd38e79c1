"""``mmalign prep TOOL ARGS...``: forward ``ARGS`` to a data preparation tool's ``main(argv)``
(demo shards, shards from a manifest, a tokenizer); ``mmalign prep TOOL --help`` shows the
tool's own options.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "make-demo", "--out", "data/demo", "--limit", "100"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

HELP = "write WebDataset shards (demo data, manifests) or train a tokenizer"
PREP_TOOLS = {
    "make-demo": "the digit demo's shards (mmalign.demo.data)",
    "from-manifest": "shards from a CSV/JSONL manifest (mmalign.prep.from_manifest)",
    "train-tokenizer": "a SentencePiece tokenizer from text (mmalign.prep.train_tokenizer)",
    "group-shards": "export rows ordered by k-means cluster (mmalign.export.group_shards)",
    "mine-negatives": "an export's records with hard negatives (mmalign.export.mine_negatives)",
}
"""``mmalign prep`` tools and what each writes (its module)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tool name, then everything else for the tool."""
    parser.add_argument("tool", choices=sorted(PREP_TOOLS), help="the data preparation tool")
    parser.add_argument(
        "arguments", nargs=argparse.REMAINDER, help="the tool's own arguments (see TOOL --help)"
    )
    parser.epilog = "tools: " + "; ".join(f"{name}: {what}" for name, what in PREP_TOOLS.items())


def tool_main(tool: str) -> Callable[[list[str]], int | None]:
    """The ``main(argv)`` of a tool, imported now (explicitly: no import by name)."""
    if tool == "make-demo":
        from mmalign.demo.data import main
    elif tool == "from-manifest":
        from mmalign.prep.from_manifest import main
    elif tool == "train-tokenizer":
        from mmalign.prep.train_tokenizer import main
    elif tool == "group-shards":
        from mmalign.export.group_shards import main
    elif tool == "mine-negatives":
        from mmalign.export.mine_negatives import main
    else:
        raise ValueError(f"unknown prep tool {tool!r}; one of {sorted(PREP_TOOLS)}")
    return main


def run(args: argparse.Namespace) -> int:
    """Run the tool and return the status of its ``main``."""
    return int(tool_main(args.tool)(list(args.arguments)) or 0)
