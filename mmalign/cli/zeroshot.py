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

from mmalign.cli.common import add_classes_arguments, add_data_arguments, fields

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


def run(args: argparse.Namespace) -> int:
    """Classify and print the sample count and metrics as JSON."""
    import json

    from mmalign.eval.zeroshot import run_zeroshot

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
    )
    print(json.dumps({"samples": result["samples"], **result["metrics"]}, indent=2))
    return 0
