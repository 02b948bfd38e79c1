"""The ``mmalign`` command: parser assembly, dispatch to a subcommand, and error handling.

Subcommands (one module each in :mod:`mmalign.cli`): ``train``, ``eval``, ``zeroshot``,
``export``, ``search``, ``serve``, ``convert``, ``prep``, ``demo``. Building the parser imports only
:mod:`mmalign.cli` and :mod:`mmalign.errors`, so ``mmalign --help`` answers without loading
torch. Errors the user can fix end in one line on stderr and status 2:
``mmalign: error: <what> (<flag, config field or file:key>); <what to do>``. That holds for
usage errors (argparse's, see :class:`OneLineParser`), a :class:`~mmalign.errors.UserError`
and a file-system error naming its path (:mod:`mmalign.cli.file_system_errors`: missing, a
directory where a file belongs or the other way round, unreadable, read-only, full, a name too
long...), with advice that fits the command. A training run stopped by non-finite losses ends
with status 1; ``mmalign --debug ...`` shows the traceback instead. Several processes:
``accelerate launch -m mmalign train CONFIG``.

Example:
    >>> main(["train", "run.yaml", "--set", "train.steps=20"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from types import ModuleType
from typing import NoReturn

from mmalign.cli import convert, demo, export, prep, search, serve, train, zeroshot
from mmalign.cli import eval as eval_
from mmalign.cli.common import add_subcommands
from mmalign.cli.file_system_errors import path_problem
from mmalign.errors import UserError

# A deprecation users cannot act on: Accelerate still passes DDP's `broadcast_buffers`.
# (torch_geometric's import-time `torch.jit.script` is silenced where it is imported.)
warnings.filterwarnings(
    "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
)

SUBCOMMANDS: dict[str, ModuleType] = {
    "train": train,
    "eval": eval_,
    "zeroshot": zeroshot,
    "export": export,
    "search": search,
    "serve": serve,
    "convert": convert,
    "prep": prep,
    "demo": demo,
}
"""Each subcommand and its module (``HELP``, ``add_arguments(parser)``, ``run(args)``)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line in the ``mmalign: error:`` shape
    (argparse prints the whole usage first), naming the argument and pointing at ``--help``.

    Example:
        >>> import contextlib, io
        >>> parser = OneLineParser(prog="mmalign search")
        >>> _ = parser.add_argument("--k", type=int)
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     try:
        ...         parser.parse_args(["--k", "x"])
        ...     except SystemExit as exited:
        ...         print(exited.code)
        2
        >>> err.getvalue()
        "mmalign: error: invalid int value: 'x' (--k); see mmalign search --help\\n"
    """

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit with status 2."""
        what, where, todo = usage_problem(one_line(message))
        todo = todo or f"see {self.prog} --help"
        line = f"{what} ({where}); {todo}" if where else f"{what}; {todo}"
        self.exit(2, f"mmalign: error: {readable(line)}\n")


USAGE_FORMS = (
    (
        r"argument ([^:]+): invalid choice: (.*) \(choose from (.*)\)",
        "invalid choice {1}",
        "choose from {2}",
    ),
    (r"argument ([^:]+): (.*)", "{1}", ""),
    (r"the following arguments are required: (.*)", "missing required argument(s)", ""),
    (r"unrecognized arguments: (.*)", "unrecognized argument(s)", ""),
    (r"one of the arguments (.*) is required", "one of these arguments is required", ""),
)
"""argparse's usage messages as ``(pattern, what, what to do)``: group 1 is where (the
flags), the other groups fill the templates."""


def usage_problem(message: str) -> tuple[str, str | None, str]:
    """An argparse usage message split into what is wrong, the flags it concerns and what to
    do (from the message's ``; ...`` tail, or ``""``): the parts of the one-line form.

    Example:
        >>> usage_problem("argument --out: '.' is the working directory; name a new one")
        ("'.' is the working directory", '--out', 'name a new one')
        >>> usage_problem("argument --to: invalid choice: 'x' (choose from 'hf', 'onnx')")
        ("invalid choice 'x'", '--to', "choose from 'hf', 'onnx'")
    """
    for pattern, what, todo in USAGE_FORMS:
        found = re.fullmatch(pattern, message)
        if found:
            groups = found.groups()
            problem, _, tail = what.format(*groups).partition("; ")
            return problem, found.group(1), todo.format(*groups) or tail
    problem, _, tail = message.partition("; ")
    return problem, None, tail


def build_parser() -> argparse.ArgumentParser:
    """The ``mmalign`` argument parser with every subcommand.

    Example:
        >>> build_parser().parse_args(["search", "emb", "--text", "a seven"]).command
        'search'
    """
    parser = OneLineParser(prog="mmalign", description="Contrastive alignment of many modalities.")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line"
    )
    add_subcommands(parser, SUBCOMMANDS, dest="command", metavar="COMMAND")
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


LONGEST_WORD = 200
"""How many characters of one word (a run without spaces: an echoed value, a path) an error
shows; a longer one is cut with ``...``."""

LONG_WORD = re.compile(rf"\S{{{LONGEST_WORD + 1},}}")

LONGEST_PARTS = (400, 200, 300)
"""How many characters of what is wrong, where and what to do an error shows (a library's
paragraph quoted in what is wrong is cut with ``...``)."""

ERROR_PARTS = re.compile(r"(?P<what>.*) \((?P<where>[^()]*)\); (?P<todo>.*)")
"""``<what> (<where>); <what to do>``: the last parenthesis followed by ``; `` ends what."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def readable(message: str) -> str:
    """``message`` on one line, each word cut to :data:`LONGEST_WORD` characters and each
    part to :data:`LONGEST_PARTS`, keeping the ``(<where>); <what to do>`` form whole.

    Example:
        >>> line = readable("'" + "9" * 5000 + "' is not a number (--set train.lr); give a number")
        >>> len(line), line[-54:]
        (248, '999... is not a number (--set train.lr); give a number')
    """
    line = one_line(message)
    parts = ERROR_PARTS.fullmatch(line)
    if parts is None:
        return _shorten(line, sum(LONGEST_PARTS))
    what, where, todo = (
        _shorten(part, limit)
        for part, limit in zip(parts.group("what", "where", "todo"), LONGEST_PARTS, strict=True)
    )
    return f"{what} ({where}); {todo}"


def _shorten(text: str, limit: int) -> str:
    """``text`` with each word cut to :data:`LONGEST_WORD` characters, then to ``limit``."""
    return _cut(LONG_WORD.sub(lambda word: _cut(word[0], LONGEST_WORD), text), limit)


def _training_stopped(error: BaseException) -> bool:
    """Whether ``error`` is :class:`mmalign.training.TrainingStopped` (only a loaded training
    package can have raised one, so nothing is imported here)."""
    training = sys.modules.get("mmalign.training")
    stopped = getattr(training, "TrainingStopped", None)
    return stopped is not None and isinstance(error, stopped)


def main(argv: list[str] | None = None) -> int:
    """Run ``mmalign`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Status 2 and one line ``mmalign: error: MESSAGE`` on stderr for a usage error, a
    :class:`~mmalign.errors.UserError` or a path that cannot be opened; status 1 for a
    stopped training run; with ``--debug`` those errors propagate with their traceback.
    Warnings are one line each (:func:`one_line_warning`) unless ``--debug``.
    """
    args = build_parser().parse_args(argv)
    shown = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = one_line_warning
    try:
        return SUBCOMMANDS[args.command].run(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"mmalign: error: {readable(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        problem = path_problem(error, vars(args))
        if args.debug or problem is None:
            raise
        print(f"mmalign: error: {readable(problem)}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug or not _training_stopped(error):
            raise
        print(f"mmalign {args.command}: {one_line(str(error))}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = shown


def one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """A warning as the CLI shows it: one line ``mmalign: warning: <category>: <message>``
    (Python's default adds the file, line number and source line; ``--debug`` keeps them).

    Example:
        >>> warning = UserWarning("dim 4 is not a trained prefix")
        >>> print(one_line_warning(warning, UserWarning, "x.py", 3), end="")
        mmalign: warning: UserWarning: dim 4 is not a trained prefix
    """
    return f"mmalign: warning: {category.__name__}: {one_line(str(message))}\n"
