"""``mmalign convert RUN_OR_MODEL --to open_clip|hf|onnx --out DIR``: hand a model to other
tools (:mod:`mmalign.convert`).

- ``--to open_clip``: the image and text towers as a folder that
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads strictly (``--image`` /
  ``--text`` pick the towers when a model has several);
- ``--to hf``: each tower that came from ``transformers`` as an ``AutoModel`` folder plus its
  projection and a README;
- ``--to onnx``: each tower (or ``--modality``) with its projection as ``<modality>.onnx``.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["convert", "runs/clip", "--to", "open_clip", "--out", "clip"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse

from mmalign.errors import UserError

HELP = "write a model for open_clip, Hugging Face transformers or ONNX"
TARGETS = ("open_clip", "hf", "onnx")
ONLY_FOR = {"image": "open_clip", "text": "open_clip", "modality": "onnx"}
"""Options that apply to one target only."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the target and the output folder, then the target's own options."""
    parser.add_argument("model", help="a run directory (with model/) or a model directory")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the target format")
    parser.add_argument("--out", required=True, help="output folder (replaced when it exists)")
    parser.add_argument("--image", help="open_clip: the image modality (default: the only one)")
    parser.add_argument("--text", help="open_clip: the text modality (default: the only one)")
    parser.add_argument(
        "--modality", action="append", help="onnx: a modality to export (repeat; default: all)"
    )


def run(args: argparse.Namespace) -> int:
    """Convert and print the output folder and the files written."""
    from pathlib import Path

    from mmalign.convert import to_hf, to_onnx, to_open_clip
    from mmalign.eval.loading import load_model

    for option, target in ONLY_FOR.items():
        if getattr(args, option) is not None and args.to != target:
            raise UserError(
                f"--{option} applies to --to {target} only (--{option}); drop it for --to {args.to}"
            )
    model = load_model(args.model)
    if args.to == "open_clip":
        out = to_open_clip(model, args.out, image=args.image, text=args.text)
    elif args.to == "hf":
        out = to_hf(model, args.out)
    else:
        out = to_onnx(model, args.out, args.modality)
    files = sorted(str(path.relative_to(out)) for path in Path(out).rglob("*") if path.is_file())
    print(f"wrote {args.to} to {out}: {', '.join(files)}")
    return 0
