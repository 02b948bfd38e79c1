"""Train a SentencePiece tokenizer on the text of shards or of a manifest.

    mmalign prep train-tokenizer --shards 'data/digits/train-{000000..000007}.tar' \\
        --field txt --out data/spm.model --vocab-size 256
    mmalign prep train-tokenizer --manifest pairs.csv --field caption --out spm.model

``--field`` is the record extension (shards) or the column (manifest; cells naming a file
next to the manifest are read from it). The model reserves ``pad`` = 0, ``unk`` = 1,
``bos`` = 2 and ``eos`` = 3 (the text tower pools at ``eos``); ``--vocab-size`` is an upper
bound, so small corpora still train.

Example:
    >>> train_tokenizer(texts_from_manifest(Path("pairs.jsonl"), "text"), Path("m.model"), 1000)
    ... # doctest: +SKIP
    120
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import sentencepiece

from mmalign.data.records import iterate_records
from mmalign.errors import UserError
from mmalign.files import atomic_write
from mmalign.prep.from_manifest import read_manifest
from mmalign.progress import progress_bar


def texts_from_shards(shards: Sequence[str], extension: str) -> Iterator[str]:
    """The strings stored under ``extension`` in the shards (records without it are skipped)."""
    for record in iterate_records(list(shards), {"text": extension}, field="--shards"):
        if isinstance(record["text"], str):
            yield record["text"]


def texts_from_manifest(manifest: Path, column: str) -> Iterator[str]:
    """The cells of ``column`` (file contents for cells that name a file)."""
    for row in read_manifest(manifest):
        value = row.get(column)
        if value is None or value == "":
            continue
        path = manifest.parent / str(value)
        yield path.read_text(encoding="utf-8") if path.is_file() else str(value)


def train_tokenizer(
    texts: Iterator[str],
    out: Path,
    vocab_size: int = 1000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> int:
    """Train and write a SentencePiece model; returns the number of training sentences.

    ``out`` is written whole or not at all (:func:`~mmalign.files.atomic_write`) and replaces
    only an earlier tokenizer (:func:`check_tokenizer_output`). On a terminal a progress bar
    on stderr counts the sentences read (with their rate), then says that SentencePiece
    trains on them (one native call, which reports no progress).
    """
    check_tokenizer_output(out)
    count = 0
    bar = progress_bar(desc=f"read texts for {out.name}", unit="sentence")

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            bar.update()
            yield text.replace("\n", " ")
        bar.set_description(f"train SentencePiece on the {count} sentences", refresh=True)

    def train(model_file: IO[bytes]) -> None:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=counted(),
            model_writer=model_file,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            minloglevel=2,
        )

    with bar:
        atomic_write(out, train)
    return count


def check_tokenizer_output(out: Path) -> None:
    """Refuse an ``out`` that exists and is not a SentencePiece model (a run's file, a
    folder, a link): training would replace it. An earlier tokenizer may be replaced.

    Example:
        >>> check_tokenizer_output(Path("/"))
        Traceback (most recent call last):
        ...
        mmalign.errors.UserError: / exists and is not a SentencePiece model (--out); ...
    """
    if out.is_symlink() or out.is_dir() or (out.exists() and not _is_tokenizer(out)):
        raise UserError(
            f"{out} exists and is not a SentencePiece model (--out); training would replace "
            "it: name a new .model file"
        )


def _is_tokenizer(path: Path) -> bool:
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return False
    return True
