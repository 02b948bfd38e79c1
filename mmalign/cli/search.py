"""``mmalign search INDEX_DIR [--text "..."] [--image PATH] [--audio PATH] [--query M=VALUE]
[--weights M=W,...]``: query an exported index (:func:`mmalign.export.search`) with one
modality or several composed, and print the best-scoring rows.

The command line owns the parsing of query strings: ``--text``, ``--image`` and ``--audio``
(and ``--query NAME=VALUE``) name a modality or a tower type (the model's first modality of
that type, see :func:`resolve_query_modality`); a tabular tower's value is a JSON list and a
graph tower's a ``.json`` file (see :func:`parse_raw`).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["search", "emb", "--text", "a handwritten seven", "--k", "3"])  # doctest: +SKIP
    rank  score   key         cls
    1     0.8312  test-000017 7
    ...
    0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmalign.cli.common import bounded, check_model, check_path, csv_list, key_value
from mmalign.errors import UserError

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

HELP = "query an exported index"
QUERY_KINDS = ("text", "image", "audio")
"""The shorthand query options; each names a modality or a tower type."""
FILE_QUERIES = ("image", "audio")
"""The shorthand options whose value is a file, read before the model is loaded."""
MAX_K = 1 << 24
"""The most results ``--k`` asks for (as many as ``--nlist``'s bound): far beyond a
useful listing; an index with fewer rows returns them all."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The index directory, one or more query modalities (composed: scored together by the
    model's objective), ``--weights``, then ``--k``, ``--target``, ``--model``."""
    parser.add_argument("index", help="an export directory with a built index")
    parser.add_argument("--text", help="a text query")
    parser.add_argument("--image", help="an image file")
    parser.add_argument("--audio", help="a wav/flac file")
    parser.add_argument(
        "--query",
        type=key_value,
        action="append",
        metavar="MODALITY=VALUE",
        help="any modality: text, a path, a JSON list (tabular) or a .json file (graph)",
    )
    parser.add_argument(
        "--weights",
        type=csv_list,
        metavar="MODALITY=W,...",
        help="per query modality weights of a pairwise model's summed similarities; a "
        "negative weight ranks away from that query (text=-0.5: unlike the text)",
    )
    parser.add_argument(
        "--k", type=bounded(int, 1, MAX_K), default=10, help=f"results to return (1 to {MAX_K})"
    )
    parser.add_argument("--target", help="indexed modality to search (default: the only one)")
    parser.add_argument("--model", help="model or run directory (default: the exported one)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")


def resolve_query_modality(model: AlignmentModel, name: str, flag: str = "--query") -> str:
    """A modality name, or a tower type (``text``, ``image``, ...) naming the model's first
    modality of that type; else a :class:`~mmalign.errors.UserError` naming ``flag``.

    Example:
        >>> from types import SimpleNamespace
        >>> towers = {"caption": {"type": "text"}, "photo": {"type": "image"}}
        >>> from mmalign.config import ModelConfig
        >>> model = SimpleNamespace(modalities=list(towers), config=ModelConfig(towers=towers))
        >>> resolve_query_modality(model, "image"), resolve_query_modality(model, "caption")
        ('photo', 'caption')
    """
    found = model.config.modality_named(name)
    if found is not None:
        return found
    types = sorted({model.config.towers[modality].type for modality in model.modalities})
    raise UserError(
        f"the model has no modality or tower type {name!r} ({flag}); use one of its "
        f"modalities: {', '.join(model.modalities)} (or a tower type: {', '.join(types)})"
    )


def check_readable(path: str, kind: str, flag: str) -> None:
    """A :class:`~mmalign.errors.UserError` naming ``flag`` unless ``path`` is a file that
    decodes as an ``image`` or ``audio`` query within the per-record limits
    (:func:`mmalign.export.search.read_query_file`, as the search reads it), before the model
    is loaded."""
    from mmalign.export.search import read_query_file

    check_path(path, flag)
    read_query_file(kind, path, kind, flag=flag)


def parse_raw(model: AlignmentModel, modality: str, raw: str) -> Any:
    """The sample a command-line value stands for: a JSON list for tabular towers; for a
    tower that reads files (an image, an audio clip or a video's audio track, a video, a
    time series, a graph ``.json``) the file decoded as the search would, within the
    per-record limits (:func:`mmalign.export.search.read_query_file`, its errors naming
    ``--query MODALITY=...``); else the string (text).

    Example:
        >>> from types import SimpleNamespace
        >>> from mmalign.config import ModelConfig
        >>> config = ModelConfig(towers={"x": {"type": "tabular", "in_features": 2}})
        >>> model = SimpleNamespace(config=config)
        >>> parse_raw(model, "x", "[0.5, 1]")
        [0.5, 1]
    """
    from mmalign.data.decode import FILE_KINDS
    from mmalign.export.search import read_query_file

    kind, flag = model.config.towers[modality].type, f"--query {modality}=..."
    if kind in FILE_KINDS:
        check_path(raw, flag)
        return read_query_file(modality, raw, kind, flag=flag)
    if kind == "tabular":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise UserError(
                f"the query of tabular modality {modality!r} is not a JSON list of numbers: "
                f"{raw!r} ({error}) ({flag}); pass e.g. [0.1, 2.5]"
            ) from None
    return raw


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    """Search results as an aligned text table: rank, score, key, then the metadata.

    Example:
        >>> print(format_results([{"rank": 1, "score": 0.5, "key": "a", "cls": 7}]))
        rank  score   key  cls
        1     0.5000  a    7
    """
    if not rows:
        return "no results"
    columns = list(rows[0])
    cells = [
        [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def queries_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(modality or tower type, value)`` of every query option given (at least one)."""
    given = [(kind, getattr(args, kind)) for kind in QUERY_KINDS if getattr(args, kind)]
    given += list(args.query or [])
    if not given:
        raise UserError("no query (--text, --image, --audio, --query); give at least one")
    return given


def weights_of(model: AlignmentModel, items: Sequence[str] | None) -> dict[str, float] | None:
    """``--weights text=1,audio=0.5`` as ``{modality: weight}`` (names as in queries).

    Example:
        >>> from types import SimpleNamespace
        >>> towers = {"caption": {"type": "text"}}
        >>> from mmalign.config import ModelConfig
        >>> model = SimpleNamespace(modalities=list(towers), config=ModelConfig(towers=towers))
        >>> weights_of(model, ["text=0.5"])
        {'caption': 0.5}
    """
    if not items:
        return None
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weights[resolve_query_modality(model, name, "--weights")] = float(value)
        except ValueError:
            raise UserError(
                f"entry {item!r} is not MODALITY=NUMBER (--weights); write e.g. text=0.5"
            ) from None
    return weights


def run(args: argparse.Namespace) -> int:
    """Load the model (``--model`` or the exported one), encode the query, print the rows."""
    from mmalign.data.exports import read_manifest
    from mmalign.eval.loading import load_model
    from mmalign.export import search
    from mmalign.export.index import indexed_modalities

    check_path(args.index, "INDEX", kind="directory")
    for kind in FILE_QUERIES:
        if getattr(args, kind) is not None:
            check_readable(getattr(args, kind), kind, f"--{kind}")
    manifest = read_manifest(args.index)
    built = indexed_modalities(args.index)
    if (args.target is None and len(built) != 1) or args.target not in (None, *built):
        what = f"indexes for {', '.join(built)}" if built else "no index"
        asked = f"no index for {args.target!r}: " if args.target else ""
        raise UserError(
            f"{asked}{args.index} has {what} (--target); pass --target with an indexed "
            "modality, or build an index with mmalign export --index flat"
        )
    if args.model is not None:
        check_model(args.model, "--model")
    model_path = args.model or manifest["settings"].get("model_path")
    if model_path is None:
        raise UserError(f"{args.index} was exported from an in-memory model; pass --model DIR")
    model = load_model(model_path)
    queries = {}
    for name, value in queries_of(args):
        modality = resolve_query_modality(
            model, name, f"--{name}" if name in QUERY_KINDS else "--query"
        )
        if modality in queries:
            raise UserError(f"two queries for modality {modality!r} (--{name}); give one each")
        queries[modality] = parse_raw(model, modality, value)
    weights = weights_of(model, args.weights)
    rows = search(args.index, model, queries, None, args.k, target=args.target, weights=weights)
    if args.json:
        print("\n".join(json.dumps(row, default=str) for row in rows))
    else:
        print(format_results(rows))
    return 0
