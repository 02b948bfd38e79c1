"""The ``mmalign`` command line: ``train``, ``eval``, ``zeroshot``, ``export``, ``search``,
``prep``, ``demo``.

Each subcommand is a thin layer over the library: ``train`` calls
:func:`mmalign.training.train`; ``eval|zeroshot|export|search`` use the handlers of
:mod:`mmalign.cli.commands`; ``prep TOOL ...`` forwards its arguments to
``data_prep.<tool>.main``. Several processes: ``accelerate launch -m mmalign train CONFIG``.

Example:
    >>> main(["train", "mmalign/demo/configs/demo_digits.yaml", "--set", "train.steps=20"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable

from mmalign.config import ConfigError

# A dependency scripts a module at import time; torch 2.14 warns about it on every command.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

PREP_TOOLS = {
    "make-demo": "mmalign.demo.data",
    "from-manifest": "mmalign.prep.from_manifest",
    "train-tokenizer": "mmalign.prep.train_tokenizer",
}
"""``mmalign prep`` tools and the module whose ``main(argv)`` each runs."""


def _train_command(args: argparse.Namespace) -> int:
    from mmalign.training import train

    result = train(args.config, overrides=args.set, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # one summary from a multi-process launch
        return 0
    processes = f"{result.world_size} process(es)"
    print(f"trained {result.steps} steps on {processes}; model: {result.model_dir}")
    if result.metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if "/mean" in k)
        print(f"validation: val/loss {result.metrics.get('val/loss', float('nan')):.4g}, {shown}")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML), e.g. mmalign/demo/configs/demo_digits.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (YAML value), e.g. --set train.steps=200; repeatable",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in train.output (fresh start when none)",
    )


def _prep_command(args: argparse.Namespace) -> int:
    module = importlib.import_module(PREP_TOOLS[args.tool])
    return int(module.main(list(args.arguments)) or 0)


def _add_prep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", choices=sorted(PREP_TOOLS), help="the data preparation tool")
    parser.add_argument(
        "arguments", nargs=argparse.REMAINDER, help="the tool's own arguments (see TOOL --help)"
    )


def _demo_command(args: argparse.Namespace) -> int:
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


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/demo", help="demo shards (built when missing)")
    parser.add_argument("--out", default="runs/demo", help="runs, figures and REPORT.md")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and a few steps (a smoke test)"
    )
    parser.add_argument(
        "--configs", default=None, help="directory of the demo_*.yaml configs (default: configs/)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --out instead of retraining"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: cores - data workers)"
    )


def _eval_subcommands() -> dict[str, tuple[str, Callable, Callable]]:
    from mmalign.cli import commands

    return {
        "eval": (
            "retrieval, zero-shot and diagnostics report of a trained model",
            commands.add_eval_arguments,
            commands.eval_command,
        ),
        "zeroshot": (
            "zero-shot classification accuracy from class prompts",
            commands.add_zeroshot_arguments,
            commands.zeroshot_command,
        ),
        "export": (
            "embeddings of shards to files, plus a nearest-neighbour index",
            commands.add_export_arguments,
            commands.export_command,
        ),
        "search": (
            "query an exported index",
            commands.add_search_arguments,
            commands.search_command,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``mmalign`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mmalign", description="Contrastive alignment of many modalities."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = subcommands.add_parser("train", help="train a model from a config")
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_train_command)
    for name, (summary, add_arguments, handler) in _eval_subcommands().items():
        command = subcommands.add_parser(name, help=summary)
        add_arguments(command)
        command.set_defaults(handler=handler)
    prep_parser = subcommands.add_parser(
        "prep", help="write WebDataset shards (demo data, manifests) or train a tokenizer"
    )
    _add_prep_arguments(prep_parser)
    prep_parser.set_defaults(handler=_prep_command)
    demo_parser = subcommands.add_parser(
        "demo", help="build the digit data, train, evaluate, index and write REPORT.md"
    )
    _add_demo_arguments(demo_parser)
    demo_parser.set_defaults(handler=_demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mmalign`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Configuration and input errors end with a one-paragraph message (status 2), not a
    traceback; a run stopped by non-finite losses ends with status 1.
    """
    from mmalign.training import TrainingStopped
    from mmalign.files import LockError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, LockError, FileNotFoundError) as error:
        print(f"mmalign {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"mmalign {args.command}: {error}", file=sys.stderr)
        return 1
