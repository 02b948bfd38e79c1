"""The demo datasets built in worker processes: one progress bar over the records they write,
and nothing half-written left behind.

Each dataset is written into a hidden staging folder (``OUT/.NAME.partial``) renamed when
complete. When a worker fails (a full disk, a file beyond the size limit) or the command is
stopped (SIGTERM from ``timeout`` or a scheduler, Ctrl-C), the workers are terminated and the
staging folders removed (``OUT`` too when this command created it and it is left empty); a
stopped command exits with status ``128 + signal`` (143, 130). Only SIGKILL leaves a staging
folder, which the next run removes before it writes.

Example:
    >>> staging_folder(Path("data"), "digits")
    PosixPath('data/.digits.partial')
    >>> list(count_written("ab"))  # outside a worker: not counted
    ['a', 'b']
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from mmalign.progress import progress_bar

Item = TypeVar("Item")
POLL_SECONDS = 0.25
"""How often the progress bar reads the workers' count."""

_written: Queue[int] | None = None
"""Where a worker reports each record it wrote (one ``1`` each; the parent sums them: a
queue, as a shared counter's memory is a file that a file-size limit would refuse); set in
each worker by :func:`_start_worker`."""


def staging_folder(out: Path, name: str) -> Path:
    """The hidden folder dataset ``name`` is written into before it is renamed to ``OUT/NAME``."""
    return out / f".{name}.partial"


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when its parent dies."""


def _end_with_parent(parent: int) -> None:
    """Have Linux send this worker SIGTERM when its parent dies (a SIGKILLed ``make-demo``
    left its workers writing for minutes); a parent already gone ends it now."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before the request took effect
        os._exit(1)


def _start_worker(written: Queue[int], parent: int) -> None:
    global _written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler, forked: not ours
    _end_with_parent(parent)
    _written = written


def count_written(records: Iterable[Item]) -> Iterator[Item]:
    """``records``, each counted on the shared progress count once the next one is asked for
    (after it was written); outside a worker of :func:`build_datasets` they pass uncounted."""
    for record in records:
        yield record
        if _written is not None:
            _written.put(1)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the block (so that cleanup runs), as Ctrl-C
    raises ``KeyboardInterrupt``; outside the main thread nothing changes."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_workers(
    build: Callable[[str, Path, dict[str, Any]], str],
    out: Path,
    names: Sequence[str],
    params: dict[str, Any],
    bar: Any,
) -> list[str]:
    written: Queue[int] = multiprocessing.Queue()
    workers = min(len(names), os.cpu_count() or 1)
    initargs = (written, os.getpid())
    with multiprocessing.Pool(workers, _start_worker, initargs) as pool:  # exit: terminate
        result = pool.starmap_async(build, [(name, out, params) for name in names])
        while not result.ready():
            result.wait(POLL_SECONDS)
            with contextlib.suppress(queue.Empty):
                while True:
                    bar.update(written.get_nowait())
        return list(result.get())


def build_datasets(
    build: Callable[[str, Path, dict[str, Any]], str],
    out: Path,
    names: Sequence[str],
    params: dict[str, Any],
    *,
    total: int,
    show: bool = True,
) -> list[str]:
    """``build(name, out, params)`` for each of ``names`` in worker processes (it writes
    through :func:`staging_folder` and counts its records with :func:`count_written`), under
    one progress bar of ``total`` records; returns their lines. On a failure or a stop the
    workers end and the staging folders are removed before the error goes on."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with (
            _sigterm_exits(),
            progress_bar(total=total, desc=f"make-demo {out}", unit="record", show=show) as bar,
        ):
            return _run_workers(build, out, names, params, bar)
    except BaseException as error:
        for name in names:
            shutil.rmtree(staging_folder(out, name), ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only when empty
                out.rmdir()
        if not isinstance(error, SystemExit | KeyboardInterrupt):
            raise
        print(f"make-demo stopped; its unfinished datasets in {out} were removed", file=sys.stderr)
        if isinstance(error, KeyboardInterrupt):
            raise SystemExit(128 + signal.SIGINT) from None
        raise
