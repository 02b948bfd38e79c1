"""``mmalign eval MODEL --data SHARDS [--label-field cls] [--classes FILE] [--out DIR]``:
retrieval (instance level, and class level from the records' labels), zero-shot and
diagnostics report of a trained model (:func:`mmalign.eval.run_eval`).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["eval", "runs/digits", "--data", "data/digits/test-000000.tar",
    ...       "--classes", "data/digits/classes.json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from typing import Any

from mmalign.cli.common import (
    add_classes_arguments,
    add_data_arguments,
    check_path,
    csv_list,
    output_directory,
    positive_int,
    positive_ints,
    present_fields,
)

HELP = "retrieval (instance and class level), zero-shot and diagnostics of a trained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Data arguments, then the report's output, modalities and zero-shot options."""
    add_data_arguments(parser, batch_size=64)
    parser.add_argument(
        "--out", type=output_directory, help="report directory (default: MODEL/eval)"
    )
    parser.add_argument("--modalities", type=csv_list, help="comma-separated (default: all)")
    parser.add_argument("--classes", help="classes.json for zero-shot classification")
    parser.add_argument("--zeroshot-modalities", type=csv_list, help="queries (default: non-text)")
    parser.add_argument("--text-modality", help="encodes the class prompts (default: first text)")
    add_classes_arguments(parser)
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument(
        "--dim",
        type=positive_int,
        help="use the first DIM coordinates, renormalized (a Matryoshka prefix; default: all)",
    )
    parser.add_argument("--linear-probe", action="store_true", help="logistic-regression probe")
    parser.add_argument(
        "--few-shot", type=positive_ints, default=[], help="shots per class: 1,5,10"
    )
    parser.add_argument("--probe-train", help="labelled train shards the probes are fitted on")
    parser.add_argument("--probe-modality", default="image", help="embeddings probed")


def run(args: argparse.Namespace) -> int:
    """Write the report and print the markdown, then the paths written."""
    from pathlib import Path

    from mmalign.eval.report import run_eval

    check_path(args.model, "MODEL", kind="directory")
    if args.classes is not None:
        check_path(args.classes, "--classes")
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    report = run_eval(
        args.model,
        args.data,
        out,
        modalities=args.modalities,
        fields=present_fields(args),
        classes=args.classes,
        zeroshot_modalities=args.zeroshot_modalities,
        text_modality=args.text_modality,
        language=args.language,
        label_field=args.label_field,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
        dim=args.dim,
        plots=not args.no_plots,
    )
    print((out / "eval.md").read_text())
    if args.linear_probe or args.few_shot:
        print_probes(args, out)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {len(report['figures'])} figures")
    return 0


def print_probes(args: argparse.Namespace, out: Any) -> None:
    """Fit the ``--linear-probe`` / ``--few-shot`` probes, write ``probe.json``, print them."""
    import json

    from mmalign.errors import UserError
    from mmalign.eval.probe import run_probe
    from mmalign.files import write_text

    if not args.probe_train:
        raise UserError("a probe needs labelled train shards (--probe-train); give them")
    results = run_probe(
        args.model,
        args.probe_train,
        args.data,
        args.probe_modality,
        args.few_shot,
        linear=args.linear_probe,
        fields=present_fields(args),
        label_field=args.label_field,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    write_text(out / "probe.json", json.dumps(results, indent=2) + "\n")
    print(f"| {args.probe_modality} probe | test top-1 | C | fitted on |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['top1']:.1%} | {result['C']} | {result['fit_samples']} |")
