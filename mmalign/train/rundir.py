"""The run directory: one training run at a time (a PID lock) and no silent overwrites.

Layout of ``train.output``::

    config.yaml        the resolved config of the run
    run.json           world size, precision, device, versions
    metrics.jsonl      one JSON record per log / validation step
    events.out.tfevents.*   TensorBoard
    *.png              plots of loss, temperature, validation metrics
    checkpoints/       step-XXXXXXXX/ (last K) and best/
    model/             the final model (``AlignmentModel.from_pretrained``)

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp, RunLock(Path(tmp)) as lock:
    ...     lock.path.name
    '.lock'
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"


class RunDirectoryError(RuntimeError):
    """The output directory is in use or holds a run that would be overwritten."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file ``OUTPUT/.lock`` holding the PID and host of the running job.

    A lock left by a dead process on the same host is taken over. ``user`` and ``advice``
    word the error for other kinds of jobs (an export: ``RunLock(out, user="export",
    advice="export into another directory")``).
    """

    def __init__(
        self,
        directory: Path,
        name: str = LOCK_NAME,
        user: str = "training run",
        advice: str = "set train.output to another directory",
    ) -> None:
        self.path = directory / name
        self.user = user
        self.advice = advice
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirectoryError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (
                    owner[0] != socket.gethostname() or _process_alive(owner[1])
                ):
                    raise RunDirectoryError(
                        f"{self.path.parent} is used by another {self.user} (PID {owner[1]} on "
                        f"{owner[0]}); wait for it to finish or {self.advice} (delete "
                        f"{self.path} if that {self.user} is gone)"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return
        raise RunDirectoryError(f"could not take the lock {self.path}; another run raced for it")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def check_fresh_or_resume(directory: Path, resume: bool) -> None:
    """Refuse to start a new run over an existing one unless resuming."""
    if resume or not directory.is_dir():
        return
    markers = [
        name for name in ("config.yaml", "checkpoints", "model") if (directory / name).exists()
    ]
    if markers:
        raise RunDirectoryError(
            f"{directory} already holds a training run ({', '.join(markers)}); pass --resume "
            f"(resume=True) to continue it, or set train.output to a new directory"
        )
