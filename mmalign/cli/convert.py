"""``mmalign convert RUN_OR_MODEL --to open_clip|hf|onnx --out DIR``: hand a model to other
tools (:mod:`mmalign.convert`).

- ``--to open_clip``: the image and text towers as a folder that
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads strictly (``--image`` /
  ``--text`` pick the towers when a model has several);
- ``--to hf``: each tower that came from ``transformers`` as an ``AutoModel`` folder plus its
  projection and a README;
- ``--to onnx``: each tower (or ``--modality``) with its projection as ``<modality>.onnx``.

Each format is one line of :data:`CONVERTERS`: its converter function and the options it
takes (an option of one format only is refused with the others).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["convert", "runs/clip", "--to", "open_clip", "--out", "clip"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import importlib

from mmalign.cli.common import check_model, output_directory
from mmalign.errors import UserError

HELP = "write a model for open_clip, Hugging Face transformers or ONNX"
CONVERTERS: dict[str, tuple[str, dict[str, str]]] = {
    "open_clip": ("mmalign.convert.open_clip:to_open_clip", {"image": "image", "text": "text"}),
    "hf": ("mmalign.convert.hf:to_hf", {}),
    "onnx": ("mmalign.convert.onnx:to_onnx", {"modalities": "modality"}),
}
"""Format -> (``module:function`` called as ``function(model, out, **options)``, its keyword
arguments -> the command-line option that gives each)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the target and the output folder, then the target's own options."""
    parser.add_argument("model", help="a run directory (with model/) or a model directory")
    parser.add_argument("--to", required=True, choices=list(CONVERTERS), help="the target format")
    parser.add_argument(
        "--out",
        type=output_directory,
        required=True,
        help="a new or empty output folder (a previous output of the same --to is replaced)",
    )
    parser.add_argument("--image", help="open_clip: the image modality (default: the only one)")
    parser.add_argument("--text", help="open_clip: the text modality (default: the only one)")
    parser.add_argument(
        "--modality", action="append", help="onnx: a modality to export (repeat; default: all)"
    )


def run(args: argparse.Namespace) -> int:
    """Convert and print the output folder and the files written."""
    from pathlib import Path

    from mmalign.output_owner import Output, check_output

    function, options = CONVERTERS[args.to]
    own = set(options.values())
    for target, (_, others) in CONVERTERS.items():
        for option in set(others.values()) - own:
            if getattr(args, option):
                raise UserError(
                    f"an option of --to {target} only (--{option}); drop it for --to {args.to}"
                )
    # before torch and the model load: refuse foreign folders and the source at once (the
    # owner is mmalign.convert.common.converter_output, whose module imports torch)
    check_output(args.out, Output(f"convert --to {args.to}", "--out", replaced=True), [args.model])
    check_model(args.model, "MODEL")
    from mmalign.eval.loading import load_model

    module, name = function.split(":")
    convert = getattr(importlib.import_module(module), name)
    model = load_model(args.model)
    out = convert(
        model, args.out, **{key: getattr(args, option) for key, option in options.items()}
    )
    files = sorted(str(path.relative_to(out)) for path in Path(out).rglob("*") if path.is_file())
    print(f"wrote {args.to} to {out}: {', '.join(files)}")
    return 0
