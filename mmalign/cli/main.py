"""The ``mmalign`` command: parser assembly, dispatch to a subcommand, and error handling.

Subcommands (one module each in :mod:`mmalign.cli`): ``train``, ``eval``, ``zeroshot``,
``export``, ``search``, ``convert``, ``prep``, ``demo``. Building the parser imports only
:mod:`mmalign.cli` and :mod:`mmalign.errors`, so ``mmalign --help`` answers without loading
torch. Errors the user can fix (:class:`~mmalign.errors.UserError`, a missing file) end in one
line on stderr (``mmalign: error: ...``) and status 2; a training run stopped by non-finite
losses ends with status 1; ``mmalign --debug ...`` shows the traceback instead. Several processes:
``accelerate launch -m mmalign train CONFIG``.

Example:
    >>> main(["train", "run.yaml", "--set", "train.steps=20"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import sys
import warnings
from types import ModuleType

from mmalign.cli import convert, demo, export, prep, search, train, zeroshot
from mmalign.cli import eval as eval_
from mmalign.errors import UserError

# A dependency scripts a module at import time; torch 2.14 warns about it on every command.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

SUBCOMMANDS: dict[str, ModuleType] = {
    "train": train,
    "eval": eval_,
    "zeroshot": zeroshot,
    "export": export,
    "search": search,
    "convert": convert,
    "prep": prep,
    "demo": demo,
}
"""Each subcommand and its module (``HELP``, ``add_arguments(parser)``, ``run(args)``)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mmalign`` argument parser with every subcommand.

    Example:
        >>> build_parser().parse_args(["search", "emb", "--text", "a seven"]).command
        'search'
    """
    parser = argparse.ArgumentParser(
        prog="mmalign", description="Contrastive alignment of many modalities."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line"
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        command = subcommands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        # `mmalign train CONFIG --debug` too; SUPPRESS keeps a top-level --debug when absent
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        command.set_defaults(run=module.run)
    return parser


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined by ``"; "`` (by a space after a ``:``).

    Example:
        >>> one_line("invalid config:\\n  a: bad\\n  b: worse")
        'invalid config: a: bad; b: worse'
    """
    text = ""
    for line in (line.strip() for line in message.splitlines()):
        if not line:
            continue
        separator = "" if not text else " " if text.endswith(":") else "; "
        text += separator + line
    return text


def _training_stopped(error: BaseException) -> bool:
    """Whether ``error`` is :class:`mmalign.training.TrainingStopped` (only a loaded training
    package can have raised one, so nothing is imported here)."""
    training = sys.modules.get("mmalign.training")
    stopped = getattr(training, "TrainingStopped", None)
    return stopped is not None and isinstance(error, stopped)


def main(argv: list[str] | None = None) -> int:
    """Run ``mmalign`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Status 2 and one line ``mmalign: error: MESSAGE`` on stderr for a
    :class:`~mmalign.errors.UserError` or a missing file; status 1 for a stopped training
    run; with ``--debug`` those errors propagate with their traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"mmalign: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug or not _training_stopped(error):
            raise
        print(f"mmalign {args.command}: {one_line(str(error))}", file=sys.stderr)
        return 1
