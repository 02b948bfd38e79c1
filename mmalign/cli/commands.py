"""Arguments and handlers of ``mmalign eval|zeroshot|export|search``, so the CLI stays thin.

Each command has ``add_<command>_arguments(parser)`` and ``<command>_command(args) -> int``
(the exit status); ``mmalign/cli.py`` wires them to its subcommands.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_search_arguments(parser)
    >>> parser.parse_args(["emb", "--text", "a seven", "--k", "3"]).k
    3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.eval.report import run_eval
from mmalign.eval.zeroshot import run_zeroshot


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fields(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    fields = {}
    for pair in pairs:
        if "=" not in pair:
            raise argparse.ArgumentTypeError(f"--field {pair!r} must look like modality=extension")
        name, extension = pair.split("=", 1)
        fields[name] = extension
    return fields


def _add_data_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("model", help="a run directory (with model/) or a model directory")
    parser.add_argument("--data", required=True, help="shards: brace pattern, directory or URL")
    parser.add_argument(
        "--field",
        action="append",
        metavar="MODALITY=EXT",
        help="record extension of a modality (default: the run's data.fields, else by type)",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--workers", type=int, default=0)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``mmalign eval RUN_OR_MODEL --data SHARDS [--classes FILE] [--out DIR]``."""
    _add_data_arguments(parser, batch_size=64)
    parser.add_argument("--out", help="report directory (default: MODEL/eval)")
    parser.add_argument("--modalities", type=_csv, help="comma-separated (default: all)")
    parser.add_argument("--classes", help="classes.json for zero-shot classification")
    parser.add_argument("--zeroshot-modalities", type=_csv, help="queries (default: non-text)")
    parser.add_argument("--text-modality", help="encodes the class prompts (default: first text)")
    parser.add_argument("--language", help="language of classes.json ('all' pools them)")
    parser.add_argument("--label-field", default="cls")
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--no-plots", action="store_true")


def eval_command(args: argparse.Namespace) -> int:
    """Run :func:`~mmalign.eval.run_eval` and print the markdown report's path and metrics."""
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    report = run_eval(
        args.model,
        args.data,
        out,
        modalities=args.modalities,
        fields=_fields(args.field),
        classes=args.classes,
        zeroshot_modalities=args.zeroshot_modalities,
        text_modality=args.text_modality,
        language=args.language,
        label_field=args.label_field,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
        plots=not args.no_plots,
    )
    print((out / "eval.md").read_text())
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {len(report['figures'])} figures")
    return 0


def add_zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    """``mmalign zeroshot RUN_OR_MODEL --data SHARDS --classes FILE --query image``."""
    _add_data_arguments(parser, batch_size=64)
    parser.add_argument("--classes", required=True, help="classes.json (classnames, templates)")
    parser.add_argument(
        "--query", action="append", required=True, help="query modality (repeat for several)"
    )
    parser.add_argument("--text-modality", default="text", help="encodes the class prompts")
    parser.add_argument("--candidate-modality", help="encodes the prompts instead of text")
    parser.add_argument("--language", help="language of classes.json ('all' pools them)")
    parser.add_argument("--label-field", default="cls")
    parser.add_argument("--max-samples", type=int)


def zeroshot_command(args: argparse.Namespace) -> int:
    """Run :func:`~mmalign.eval.run_zeroshot` and print its metrics as JSON."""
    result = run_zeroshot(
        args.model,
        args.data,
        args.classes,
        args.query,
        text_modality=args.text_modality,
        candidate_modality=args.candidate_modality,
        language=args.language,
        fields=_fields(args.field),
        label_field=args.label_field,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
    )
    print(json.dumps({"samples": result["samples"], **result["metrics"]}, indent=2))
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """``mmalign export RUN_OR_MODEL --data SHARDS --out DIR [--index hnsw]``."""
    _add_data_arguments(parser, batch_size=256)
    parser.add_argument("--out", required=True, help="export directory (resumes if unfinished)")
    parser.add_argument("--modalities", type=_csv, help="comma-separated (default: all)")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--metadata", type=_csv, default=[], help="record extensions to keep")
    parser.add_argument("--index", choices=["flat", "ivf", "hnsw"], help="also build an index")
    parser.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists searched")
    parser.add_argument("--m", type=int, default=32, help="HNSW links per node")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW search beam")
    parser.add_argument("--no-progress", action="store_true")


def export_command(args: argparse.Namespace) -> int:
    """Run :func:`~mmalign.export.run_export` and print a summary."""
    from mmalign.export.writer import run_export

    manifest = run_export(
        args.model,
        args.data,
        args.modalities,
        args.out,
        index=args.index,
        index_options={
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "m": args.m,
            "ef_search": args.ef_search,
        },
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        metadata_fields=args.metadata,
        fields=_fields(args.field),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(
        f"exported {manifest['rows']} samples in {len(manifest['chunks'])} chunks to {args.out}"
        f" (records: {manifest['counters']})"
    )
    for index in manifest["indexes"]:
        print(f"index: {index}")
    return 0


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """``mmalign search INDEX_DIR --text "..." | --image PATH | --audio PATH [--k 10]``."""
    parser.add_argument("index", help="an export directory with a built index")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file")
    query.add_argument("--audio", help="a wav/flac file")
    query.add_argument("--query", metavar="MODALITY=VALUE", help="any modality: text or a path")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target", help="indexed modality to search (default: the only one)")
    parser.add_argument("--model", help="model or run directory (default: the exported one)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")


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


def search_command(args: argparse.Namespace) -> int:
    """Run :func:`~mmalign.export.run_search` and print the table (or JSON lines)."""
    from mmalign.export.writer import run_search

    if args.query is not None:
        if "=" not in args.query:
            raise SystemExit(f"--query {args.query!r} must look like MODALITY=VALUE")
        name, value = args.query.split("=", 1)
        query = {name: value}
    else:
        query = {
            kind: getattr(args, kind)
            for kind in ("text", "image", "audio")
            if getattr(args, kind) is not None
        }
    rows = run_search(args.index, query, args.k, model=args.model, target=args.target)
    if args.json:
        print("\n".join(json.dumps(row, default=str) for row in rows))
    else:
        print(format_results(rows))
    return 0
