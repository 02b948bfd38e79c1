"""SIGTERM and SIGINT during training: finish the step, save, release the lock, exit.

A cluster scheduler pre-empts a job with SIGTERM (then SIGKILL after a grace period); Ctrl-C
sends SIGINT. Inside :class:`StopSignals` the first of either only records the request: the
trainer finishes its current optimizer step, writes a checkpoint and raises
:class:`TrainingInterrupted`, which the command line turns into exit status ``128 + signal``
(143 for SIGTERM, 130 for SIGINT) after the run directory's lock is released. A second signal
ends the process at once, by that signal's default action (no checkpoint of the step).

Handlers can only be installed from the main thread; elsewhere (a run started in a thread)
the signals keep their previous behaviour.

Example:
    >>> with StopSignals() as signals:
    ...     signals.received is None
    True
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint of its current step.

    ``exit_status`` is ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).

    Example:
        >>> TrainingInterrupted(signal.SIGTERM, "stopped").exit_status
        143
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class StopSignals:
    """Records the first SIGTERM/SIGINT in ``received``; a second one kills the process."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            os.write(
                2,
                f"{name} received: finishing the current step, saving a checkpoint, then "
                f"exiting (send it again to exit at once, without saving)\n".encode(),
            )
            return
        os.write(2, f"second {name}: exiting at once without a checkpoint\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
