"""Wall-clock time of the parts of a training step (data, forward, loss, backward, optimizer).

On an accelerator, kernels run asynchronously: pass ``synchronize`` (e.g.
``torch.cuda.synchronize``) to measure each part exactly at the cost of some speed.

Example:
    >>> timer = StepTimer()
    >>> with timer.section("forward"):
    ...     _ = sum(range(1000))
    >>> sorted(timer.pop())
    ['forward']
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StepTimer:
    """Accumulates seconds per named section until :meth:`pop`."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.synchronize = synchronize
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Add the time spent inside the ``with`` block to ``name``."""
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The totals so far (seconds per section), then reset."""
        totals = dict(self.totals)
        self.totals.clear()
        return totals
