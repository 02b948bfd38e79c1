"""Progress for long loops: a tqdm bar (count, rate, elapsed time and, with a known total,
the ETA) on stderr when it is a terminal, nothing when it is not (a log file, a pipe, a
batch job); and the ETA of the plain progress lines that replace it.

Example:
    >>> with progress_bar(total=3, desc="fit", unit="model") as bar:
    ...     for _ in range(3):
    ...         bar.update()
    >>> remaining_time(done=2, total=10, elapsed=30.0)
    '2m00s'
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    show: bool = True,
    **options: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand), drawn only when ``show`` and stderr
    is a terminal; ``options`` are tqdm's (``initial``, ``position``, ``unit_scale``...)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not (show and sys.stderr.isatty()),
        dynamic_ncols=True,
        **options,
    )


def remaining_time(done: int, total: int, elapsed: float) -> str:
    """The time left at the rate so far (``elapsed`` seconds for ``done`` of ``total``),
    as ``1h02m``, ``3m05s`` or ``12s``; ``?`` before the first one is done.

    Example:
        >>> remaining_time(0, 10, 5.0), remaining_time(1, 3601, 1.0)
        ('?', '1h00m')
    """
    if done <= 0:
        return "?"
    seconds = round(max(total - done, 0) * elapsed / done)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
