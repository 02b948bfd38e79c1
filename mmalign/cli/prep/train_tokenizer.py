"""``mmalign prep train-tokenizer (--shards ... | --manifest FILE) --out FILE.model``:
:func:`mmalign.prep.train_tokenizer.train_tokenizer` on the text of shards or of a manifest.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["prep", "train-tokenizer", "--manifest", "pairs.jsonl", "--field", "text",
    ...       "--out", "m.model"])  # doctest: +SKIP
    wrote m.model (120 sentences)
    0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmalign.cli.common import fraction, positive_int
from mmalign.errors import UserError

HELP = "a SentencePiece tokenizer from the text of shards or of a manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The text source (``--shards`` or ``--manifest``), ``--field``, ``--out`` and the
    SentencePiece settings."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", nargs="+", help="shard patterns, directories or URLs")
    source.add_argument("--manifest", type=Path, help="a .csv, .tsv or .jsonl manifest")
    parser.add_argument("--field", default="txt", help="text extension (shards) or column")
    parser.add_argument("--out", type=Path, required=True, help="the .model file to write")
    parser.add_argument("--vocab-size", type=positive_int, default=1000, help="largest vocabulary")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char"])
    parser.add_argument("--character-coverage", type=fraction, default=1.0)


def run(args: argparse.Namespace) -> int:
    """Train and write the model; a one-line error when SentencePiece fails on the texts."""
    from mmalign.prep.train_tokenizer import (
        texts_from_manifest,
        texts_from_shards,
        train_tokenizer,
    )

    if args.shards:
        texts = texts_from_shards(args.shards, args.field)
    else:
        texts = texts_from_manifest(args.manifest, args.field)
    try:
        count = train_tokenizer(
            texts, args.out, args.vocab_size, args.model_type, args.character_coverage
        )
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no reason given"
        raise UserError(
            f"SentencePiece could not train on the {args.field!r} texts: {reason} (--field); "
            "check that --field names non-empty texts, or pass a smaller --vocab-size"
        ) from None
    print(f"wrote {args.out} ({count} sentences)")
    return 0
