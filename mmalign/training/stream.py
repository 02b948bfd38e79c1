"""The training data stream: epochs of a loader with a resumable position.

Each epoch is a fresh loader seeded from ``(data.seed, epoch)``; a finite loader that runs
out starts the next epoch. The position is ``(epoch, batches consumed in that epoch)``, so a
resumed run rebuilds the epoch's loader and skips the consumed batches: the same stream as
an uninterrupted run, as long as the loader is deterministic for a seed. A loader with a
``resume_mark()`` (:class:`mmalign.data.Loader` of finite data) adds it to the position as
``mark``; a resume hands it to the loader's ``fast_forward``, which passes over the records
of the marked batches without decoding them, and only the batches after the mark are
rebuilt and skipped. ``on_batch`` (if
given) is called with ``(epoch, batches, batch)`` for each batch handed out (not for the
batches a resume skips).

Example:
    >>> stream = EpochStream(lambda seed: ["a", "b"], position={"epoch": 0, "batches": 1})
    >>> next(stream), next(stream), stream.position()
    ('b', 'a', {'epoch': 1, 'batches': 1})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for ``epoch`` of a stream seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochStream:
    """Endless batches from ``make_loader(seed)``, one loader per epoch (see module doc)."""

    def __init__(
        self,
        make_loader: Callable[[int], Iterable[Any]],
        seed: int = 0,
        position: dict[str, Any] | None = None,
        on_batch: Callable[[int, int, Any], None] | None = None,
    ) -> None:
        self.make_loader = make_loader
        self.on_batch = on_batch
        self.seed = seed
        self.epoch = (position or {}).get("epoch", 0)
        self.batches = (position or {}).get("batches", 0)
        self._mark: dict[str, Any] | None = (position or {}).get("mark")
        self._loader: Iterable[Any] | None = None
        self._iterator: Iterator[Any] | None = None
        self._finished_counters: Counter[str] = Counter()

    def _open(self) -> Iterator[Any]:
        self._loader = self.make_loader(epoch_seed(self.seed, self.epoch))
        start = self._fast_forward(self._loader)
        self._iterator = iterator = iter(self._loader)
        for skipped in range(start, self.batches):
            if next(iterator, None) is None:
                raise RuntimeError(
                    f"cannot resume the data stream: epoch {self.epoch} ended after {skipped} "
                    f"batches but the checkpoint had consumed {self.batches}; were the shards "
                    "or data settings changed?"
                )
        return iterator

    def _fast_forward(self, loader: Any) -> int:
        """Batches of the epoch the loader passes over without decoding (its
        ``fast_forward`` to the position's mark, when it has one and accepts it)."""
        mark, self._mark = self._mark, None
        if mark is None or not 0 < mark["batches"] <= self.batches:
            return 0
        accepted = getattr(loader, "fast_forward", lambda mark: False)(mark)
        return int(mark["batches"]) if accepted else 0

    def prime(self) -> Iterator[Any]:
        """Open the current epoch's loader now (and skip consumed batches); its iterator."""
        return self._open() if self._iterator is None else self._iterator

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> Any:
        batch = next(self.prime(), None)
        if batch is None:
            if self.batches == 0:
                raise RuntimeError(
                    "the training data yielded no batch; check data.train, data.fields and "
                    "that data.batch_size is not larger than the data (drop_last is on)"
                )
            self._finished_counters.update(self._current_counters())
            self.epoch, self.batches = self.epoch + 1, 0
            self._open()
            return next(self)
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.epoch, self.batches, batch)
        return batch

    def _current_counters(self) -> dict[str, int]:
        return dict(getattr(self._loader, "counters", {}) or {})

    def position(self) -> dict[str, Any]:
        """The resumable position: epoch and batches consumed in it, and the loader's
        ``resume_mark()`` (where a resume may skip to without decoding) if it has one."""
        mark = getattr(self._loader, "resume_mark", lambda: None)() if self.batches else None
        return {"epoch": self.epoch, "batches": self.batches} | ({"mark": mark} if mark else {})

    def counters(self) -> dict[str, int]:
        """The loader's record counters summed over the epochs of this process."""
        return dict(self._finished_counters + Counter(self._current_counters()))
