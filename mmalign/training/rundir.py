"""The run directory: no silent overwrites (the lock is :class:`mmalign.files.DirectoryLock`).

Layout of ``train.output``::

    config.yaml        the resolved config of the run
    run.json           world size, precision, device, versions
    metrics.jsonl      one JSON record per log / validation step
    events.out.tfevents.*   TensorBoard
    *.png              plots of loss, temperature, validation metrics
    checkpoints/       step-XXXXXXXX/ (last K) and best/
    model/             the final model (``AlignmentModel.from_pretrained``)

"""

from __future__ import annotations

from pathlib import Path

from mmalign.files import LockError


def check_fresh_or_resume(directory: Path, resume: bool) -> None:
    """Refuse to start a new run over an existing one unless resuming."""
    if resume or not directory.is_dir():
        return
    markers = [
        name for name in ("config.yaml", "checkpoints", "model") if (directory / name).exists()
    ]
    if markers:
        raise LockError(
            f"{directory} already holds a training run ({', '.join(markers)}); pass --resume "
            f"(resume=True) to continue it, or set train.output to a new directory"
        )
