"""``train.log_sample_keys``: the record keys each process trained on, in order.

Each process appends one JSON line per micro-batch to
``train.output/sample_keys/rank-00000.jsonl`` (the rank in five digits):
``{"epoch": 0, "batch": 3, "keys": [...]}``, where ``epoch`` is that process's data epoch and
``batch`` counts its micro-batches in that epoch from 1 (the keys are the batch's rows: mined
negatives appear as ``key/name``). It shows which records a run saw and in what order, e.g.
that the processes of one epoch read every record once (``tests/training/test_multinode.py``).
A resumed run first drops the lines after the checkpoint's data position, since it reads those
batches again.

Example:
    >>> import tempfile
    >>> from mmalign.batch import Batch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     log = SampleKeyLog(Path(tmp), rank=1)
    ...     log(0, 1, Batch.empty(["x"], {}))
    ...     read_sample_keys(Path(tmp))
    {1: [{'epoch': 0, 'batch': 1, 'keys': []}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmalign.batch import Batch
from mmalign.files import atomic_write, open_append

DIRECTORY = "sample_keys"


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of ``path`` (a torn last line is left out)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class SampleKeyLog:
    """Appends the keys of each micro-batch of process ``rank`` to its file under
    ``output/sample_keys``; ``position`` is the data position resumed from (``None``: a
    fresh start, which drops what the file held)."""

    def __init__(self, output: Path, rank: int, position: dict[str, int] | None = None) -> None:
        self.path = Path(output) / DIRECTORY / f"rank-{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed = (position or {}).get("epoch", 0), (position or {}).get("batches", 0)
        kept = []
        if self.path.is_file():
            kept = [r for r in _records(self.path) if (r["epoch"], r["batch"]) <= resumed]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        atomic_write(self.path, lambda handle: handle.write(text.encode()))

    def __call__(self, epoch: int, batch_number: int, batch: Batch) -> None:
        """Record ``batch``, the ``batch_number``-th micro-batch of ``epoch``."""
        record = {"epoch": epoch, "batch": batch_number, "keys": list(batch.keys)}
        with open_append(self.path) as handle:
            handle.write(json.dumps(record) + "\n")


def read_sample_keys(output: Path) -> dict[int, list[dict[str, Any]]]:
    """Every process's records of the run in ``output``, by rank.

    Example:
        >>> read_sample_keys(Path("/nonexistent"))
        {}
    """
    found = sorted((Path(output) / DIRECTORY).glob("rank-*.jsonl"))
    return {int(path.stem.removeprefix("rank-")): _records(path) for path in found}
