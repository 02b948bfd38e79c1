"""Several nodes write one run directory: ``train.output`` must be a directory every process
sees (a shared filesystem: NFS, Lustre, GPFS, ...).

Only the main process (global rank 0) writes the run's files: the lock, ``config.yaml``,
``run.json``, logs, checkpoints' model and optimizer state, the final model. Every process
writes its own RNG state into each checkpoint and reads the newest checkpoint on
``--resume``, so a node whose ``train.output`` is a local disk could neither save nor resume.
:func:`require_shared_output` finds that out when the run starts: each process looks for the
lock file the main process just wrote, and every process stops with the same error when
one does not see it.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / ".lock").write_text("node0 123\\n")
    ...     sees_lock(Path(tmp) / ".lock", "node0 123\\n", wait=0), sees_lock(
    ...         Path(tmp) / ".lock", "node1 7\\n", wait=0)
    10
    (True, False)
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import gather_object

from mmalign.errors import UserError
from mmalign.files import LOCK_NAME

if TYPE_CHECKING:
    from accelerate import Accelerator


def sees_lock(lock: Path, owner: str, wait: float = 5.0) -> bool:
    """Whether ``lock`` holds ``owner`` (the main process's lock line), polling up to ``wait``
    seconds (a network filesystem may show a new file late)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if lock.read_text() == owner:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def require_shared_output(accelerator: Accelerator, output: Path, owner: str) -> None:
    """Raise the same :class:`~mmalign.errors.UserError` on every process when some process
    does not see the lock of ``output`` holding the main process's line ``owner`` (a
    collective call)."""
    if accelerator.num_processes == 1:
        return
    lock = Path(output) / LOCK_NAME
    seen = accelerator.is_main_process or sees_lock(lock, owner)
    verdicts = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    blind = [(rank, host) for rank, host, ok in verdicts if not ok]
    if blind:
        where = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise UserError(
            f"train.output {lock.parent} is not shared by every process: {where} cannot see "
            f"the lock {lock} that rank 0 wrote on {owner.split()[0]}; put train.output on a "
            "filesystem every node mounts at the same path (checkpoints and resume need it)"
        )
