"""``mmalign zeroshot MODEL --data SHARDS --classes FILE --query image``: zero-shot
classification accuracy from class prompts (:func:`mmalign.eval.run_zeroshot`).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["zeroshot", "runs/digits", "--data", "data/digits/test-000000.tar",
    ...       "--classes", "data/digits/classes.json", "--query", "image"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from typing import Any

from mmalign.cli.common import (
    add_classes_arguments,
    add_data_arguments,
    check_model,
    check_path,
    fields,
    positive_int,
)

HELP = "zero-shot classification accuracy from class prompts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Data arguments, the classes file, the query modalities and the prompt encoder."""
    add_data_arguments(parser, batch_size=64)
    parser.add_argument("--classes", required=True, help="classes.json (classnames, templates)")
    parser.add_argument(
        "--query", action="append", required=True, help="query modality (repeat for several)"
    )
    parser.add_argument("--text-modality", default="text", help="encodes the class prompts")
    parser.add_argument("--candidate-modality", help="encodes the prompts instead of text")
    add_classes_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--dim",
        type=positive_int,
        help="use the first DIM coordinates, renormalized (a Matryoshka prefix; default: all)",
    )


def format_result(result: dict[str, Any]) -> str:
    """The accuracy figures, then each class's accuracy, as aligned text.

    Example:
        >>> print(format_result({"samples": 4, "metrics": {"top1": 0.75, "top5": 1.0,
        ...     "balanced_accuracy": 0.75, "acc/zero": 0.5, "acc/one": 1.0}}))
        samples            4
        top-1 accuracy     0.7500
        top-5 accuracy     1.0000
        balanced accuracy  0.7500
        <BLANKLINE>
        class  accuracy
        zero   0.5000
        one    1.0000
    """
    metrics = result["metrics"]
    summary = [("samples", str(result["samples"]))]
    summary += [
        (f"top-{k.removeprefix('top')} accuracy", f"{v:.4f}")
        for k, v in metrics.items()
        if k.startswith("top")
    ]
    if "balanced_accuracy" in metrics:
        summary.append(("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"))
    per_class = [("class", "accuracy")] + [
        (k.removeprefix("acc/"), f"{v:.4f}") for k, v in metrics.items() if k.startswith("acc/")
    ]

    def aligned(rows: list[tuple[str, str]]) -> list[str]:
        width = max(len(name) for name, _ in rows)
        return [f"{name.ljust(width)}  {value}" for name, value in rows]

    return "\n".join([*aligned(summary), "", *aligned(per_class)])


def run(args: argparse.Namespace) -> int:
    """Classify and print the accuracies as a table (``--json``: the metrics as JSON)."""
    import json

    from mmalign.eval.zeroshot import run_zeroshot

    check_model(args.model, "MODEL")
    check_path(args.classes, "--classes")
    result = run_zeroshot(
        args.model,
        args.data,
        args.classes,
        args.query,
        text_modality=args.text_modality,
        candidate_modality=args.candidate_modality,
        language=args.language,
        fields=fields(args.field),
        label_field=args.label_field,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
        dim=args.dim,
    )
    if args.json:
        print(json.dumps({"samples": result["samples"], **result["metrics"]}, indent=2))
    else:
        print(format_result(result))
    return 0
