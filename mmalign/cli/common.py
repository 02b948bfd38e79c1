"""Arguments several subcommands share: the model, ``--data``, ``--field``, ``--batch-size``,
``--workers``, and the parsing of comma lists and ``MODALITY=VALUE`` pairs.

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
from collections.abc import Sequence


def csv_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (an argparse ``type``).

    Example:
        >>> csv_list("image, text,")
        ['image', 'text']
    """
    return [item.strip() for item in text.split(",") if item.strip()]


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
    """``--field`` values: ``"image=png;jpg"`` -> ``("image", "png;jpg")``."""
    return key_value(text, "MODALITY=EXT")


def fields(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    """The ``--field`` pairs as ``{modality: extension}``, or ``None`` when none were given."""
    return dict(pairs) if pairs else None


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
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def add_classes_arguments(parser: argparse.ArgumentParser) -> None:
    """``--language``, ``--label-field`` and ``--max-samples`` of ``eval`` and ``zeroshot``."""
    parser.add_argument("--language", help="language of classes.json ('all' pools them)")
    parser.add_argument("--label-field", default="cls", help="record extension of the label")
    parser.add_argument("--max-samples", type=int, help="stop after this many samples")
