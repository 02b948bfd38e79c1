"""Wall and CPU seconds of each named demo step (the report's timings section).

Example:
    >>> timings = Timings()
    >>> with timings.measure("nothing"):
    ...     pass
    >>> list(timings.steps), len(timings.total())
    (['nothing'], 2)
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.files import write_text


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (data workers, builders)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Timings:
    """Wall and CPU seconds of each named demo step.

    Example:
        >>> timings = Timings()
        >>> with timings.measure("nothing"):
        ...     pass
        >>> list(timings.steps)
        ['nothing']
    """

    steps: dict[str, tuple[float, float]] = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Record the wall and CPU seconds of the ``with`` block under ``name``."""
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self.steps[name] = (time.perf_counter() - wall, _cpu_seconds() - cpu)

    def save(self, path: Path) -> None:
        """Write the steps as JSON (``{name: [wall, cpu]}``)."""
        write_text(path, json.dumps(self.steps, indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> Timings:
        """The timings :meth:`save` wrote (empty when there is no such file)."""
        if not path.is_file():
            return cls()
        return cls({name: tuple(pair) for name, pair in json.loads(path.read_text()).items()})

    def total(self) -> tuple[float, float]:
        """``(wall, cpu)`` seconds of all steps together."""
        walls, cpus = zip(*self.steps.values()) if self.steps else ((0.0,), (0.0,))
        return sum(walls), sum(cpus)
