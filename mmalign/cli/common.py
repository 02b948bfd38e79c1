"""Arguments several subcommands share (and the assembly of subcommands,
:func:`add_subcommands`): the model, ``--data``, ``--field``, ``--batch-size``,
``--workers``, the parsing of comma lists, counts and ``MODALITY=VALUE`` pairs, and the checks
of path arguments (:func:`check_path`) that name the flag in the error.

Standard library only, so building the parser stays fast.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_data_arguments(parser, batch_size=64)
    >>> args = parser.parse_args(["runs/digits", "--data", "shards", "--field", "image=png"])
    >>> fields(args.field), args.batch_size
    ({'image': 'png'}, 64)
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

from mmalign.errors import UserError, file_problem


def csv_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (an argparse ``type``).

    Example:
        >>> csv_list("image, text,")
        ['image', 'text']
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def bounded(
    kind: Callable[[str], float],
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (``int`` or ``float``) between ``low`` and
    ``high`` (``None``: unbounded; ``open_*``: the bound itself excluded); anything else is a
    usage error saying the range.

    Example:
        >>> fraction = bounded(float, 0, 1, open_low=True)
        >>> fraction("0.5")
        0.5
        >>> fraction("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: '0' is not a number in (0, 1]
    """
    what = _range_text("whole number" if kind is int else "number", low, high, open_low, open_high)

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    convert.__name__ = what
    return convert


def _range_text(
    noun: str, low: float | None, high: float | None, open_low: bool, open_high: bool
) -> str:
    if low is not None and high is not None:
        return f"a {noun} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if low is not None:
        return f"a {noun} {'>' if open_low else '>='} {low}"
    if high is not None:
        return f"a {noun} {'<' if open_high else '<='} {high}"
    return f"a finite {noun}"


positive_int = bounded(int, 1)
"""A whole number >= 1 (an argparse ``type``): sizes and counts."""


def positive_ints(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (an argparse ``type``).

    Example:
        >>> positive_ints("1, 5,10")
        [1, 5, 10]
    """
    return [int(positive_int(item)) for item in csv_list(text)]


count = bounded(int, 0)
"""A whole number >= 0 (an argparse ``type``): worker processes, seeds."""
fraction = bounded(float, 0, 1, open_low=True)
"""A number in ``(0, 1]`` (an argparse ``type``)."""


def output_directory(text: str) -> Path:
    """An output directory to create or continue (an argparse ``type``): refused when it is a
    file, or the working directory or one above it (replacing or filling it would mix the
    output with everything else there).

    Example:
        >>> output_directory("runs/emb")
        PosixPath('runs/emb')
        >>> output_directory(".")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: '.' is the working directory or above it; name a new \
directory for the output, e.g. ./out
    """
    path = Path(text)
    try:
        exists = path.exists()
    except OSError as error:  # a name too long, a loop of links
        raise argparse.ArgumentTypeError(f"{text!r} cannot be used: {error.strerror}") from None
    if exists and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a file, not a directory; name a directory for the output"
        )
    resolved, working = path.resolve(), Path.cwd().resolve()
    if resolved == working or resolved in working.parents:
        raise argparse.ArgumentTypeError(
            f"{text!r} is the working directory or above it; name a new directory for the "
            "output, e.g. ./out"
        )
    return path


def check_path(path: str | Path, flag: str, kind: str = "file") -> Path:
    """``path`` as a :class:`Path` when it exists and is a ``kind`` (``"file"`` or
    ``"directory"``); else a :class:`~mmalign.errors.UserError` naming ``flag``.

    Example:
        >>> check_path("/", "--out", kind="directory")
        PosixPath('/')
        >>> check_path("/", "--classes")
        Traceback (most recent call last):
        ...
        mmalign.errors.UserError: / is a directory, not a file (--classes); pass the file itself
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist ({flag}); check the path")
    problem = file_problem(path) if kind == "file" else None
    if problem is not None:
        raise UserError(f"{path} {problem} ({flag}); pass the file itself")
    if kind == "directory" and not path.is_dir():
        raise UserError(f"{path} is a file, not a directory ({flag}); pass its directory")
    return path


def check_model(path: str | Path, flag: str) -> Path:
    """``path`` when it is a model directory or a run directory holding one (``model/``);
    else a one-line error naming ``flag`` (imports the evaluation package, so torch).

    Example:
        >>> check_model("runs/digits", "MODEL")  # doctest: +SKIP
        PosixPath('runs/digits')
    """
    from mmalign.eval.loading import model_directory

    model_directory(check_path(path, flag, kind="directory"), flag)
    return Path(path)


def key_value(text: str, what: str = "MODALITY=VALUE") -> tuple[str, str]:
    """Split ``"name=value"`` at the first ``=`` (an argparse ``type``; a bad value is a usage
    error naming ``what``).

    Example:
        >>> key_value("text=a = b")
        ('text', 'a = b')
    """
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"{text!r} must look like {what}")
    return name, value


def modality_extension(text: str) -> tuple[str, str]:
    """``--field`` values: ``"image=png;jpg"`` -> ``("image", "png;jpg")``; the extension
    list is read as ``data.fields`` is (:func:`mmalign.config.extensions.parse_alternatives`:
    no empty entry), so a bad one is a usage error before any work.

    Example:
        >>> modality_extension("image=png;jpg")
        ('image', 'png;jpg')
        >>> modality_extension("image=;")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: 'image=;' has an empty extension; write e.g. image=jpg;png
    """
    from mmalign.config.extensions import parse_alternatives

    name, extensions = key_value(text, "MODALITY=EXT")
    try:
        parse_alternatives(extensions)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty extension; write e.g. {name}=jpg;png"
        ) from None
    return name, extensions


def fields(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    """The ``--field`` pairs as ``{modality: extension}``, or ``None`` when none were given."""
    return dict(pairs) if pairs else None


def present_fields(args: argparse.Namespace) -> dict[str, str] | None:
    """:func:`fields` of ``args.field``, each checked to occur in some record of ``args.data``
    (:func:`~mmalign.data.field_presence.check_fields_present`): a typo is one error naming
    ``--field``, not a run with no row of that modality."""
    given = fields(args.field)
    if given:
        _check_present(args.data, given, "--field")
    return given


def present_metadata(args: argparse.Namespace) -> list[str]:
    """``args.metadata`` (record extensions kept as metadata columns), each checked to occur
    in some record of ``args.data``: a typo is one error naming ``--metadata``, not a column
    of nulls."""
    if args.metadata:
        _check_present(args.data, {name: name for name in args.metadata}, "--metadata")
    return list(args.metadata)


def _check_present(data: str, extensions: dict[str, str], flag: str) -> None:
    from mmalign.data.field_presence import check_fields_present
    from mmalign.data.shards import expand_shards

    try:
        urls = expand_shards(data, "--data")
    except ValueError:  # the command itself words a bad --data
        return
    check_fields_present(urls, extensions, flag)


def first_process() -> bool:
    """Whether this process prints a command's summary: a plain process, or rank 0 of a
    ``torchrun`` / ``accelerate launch`` (which set ``RANK``), so a launch prints it once.

    Example:
        >>> first_process()
        True
    """
    return os.environ.get("RANK", "0") == "0"


def add_data_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """``MODEL --data SHARDS [--field MODALITY=EXT ...] [--batch-size N] [--workers N]``."""
    parser.add_argument("model", help="a run directory (with model/) or a model directory")
    parser.add_argument("--data", required=True, help="shards: brace pattern, directory or URL")
    parser.add_argument(
        "--field",
        action="append",
        type=modality_extension,
        metavar="MODALITY=EXT",
        help="record extension of a modality (default: the run's data.fields, else by type)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--workers", type=count, default=0, help="DataLoader worker processes")


def add_classes_arguments(parser: argparse.ArgumentParser) -> None:
    """``--language``, ``--label-field`` and ``--max-samples`` of ``eval`` and ``zeroshot``."""
    parser.add_argument("--language", help="language of classes.json ('all' pools them)")
    parser.add_argument(
        "--label-field",
        default="cls",
        help="record extension of the integer class label (class-level retrieval, zero-shot)",
    )
    parser.add_argument("--max-samples", type=positive_int, help="stop after this many samples")


def add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    """The finished export a prep tool reads and the shards it writes
    (:mod:`mmalign.prep.reshard`)."""
    parser.add_argument("--embeddings", required=True, help="a finished export directory")
    parser.add_argument(
        "--out", type=output_directory, required=True, help="output directory for the shards"
    )
    parser.add_argument("--name", default="data", help="shard names: NAME-000000.tar, ...")
    parser.add_argument(
        "--maxcount", type=positive_int, default=10000, help="records per shard at most"
    )


def add_subcommands(
    parser: argparse.ArgumentParser, commands: Mapping[str, ModuleType], dest: str, metavar: str
) -> None:
    """One sub-parser of ``parser`` per command module (``HELP``, ``add_arguments(parser)``,
    ``run(args)``); the chosen name lands in ``args.<dest>``. Each also takes ``--debug``
    after its own arguments (``SUPPRESS`` keeps a ``--debug`` given earlier when absent).

    Example:
        >>> import types
        >>> hello = types.SimpleNamespace(HELP="say hello", add_arguments=lambda p: None)
        >>> parser = argparse.ArgumentParser(prog="tool")
        >>> add_subcommands(parser, {"hello": hello}, dest="command", metavar="COMMAND")
        >>> parser.parse_args(["hello", "--debug"])
        Namespace(command='hello', debug=True)
    """
    subcommands = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, module in commands.items():
        command = subcommands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
