"""Training: :func:`train` runs the Accelerate loop; ``mmalign.train`` is the same function.

- :mod:`mmalign.training.run`: :func:`train` and the run directory (lock, resume, result);
- :mod:`mmalign.training.trainer`: the step loop (:class:`~.trainer.Trainer`);
- :mod:`mmalign.training.accumulation`, :mod:`~.stream`, :mod:`~.validation`,
  :mod:`~.checkpoint`, :mod:`~.logging`, :mod:`~.optim`, :mod:`~.checks`, :mod:`~.timing`,
  :mod:`~.health` (diverged weights), :mod:`~.resume` (what may change on resume),
  :mod:`~.signals` (SIGTERM/SIGINT), :mod:`~.shared_output` (a run directory every node
  sees), :mod:`~.sample_keys` (``train.log_sample_keys``), :mod:`~.host_memory`
  (``train.host_memory``): its parts.

Example:
    >>> from mmalign.training import train
    >>> result = train("run.yaml", ["train.steps=20"])  # doctest: +SKIP
    >>> result.steps  # doctest: +SKIP
    20
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainResult": "mmalign.training.run",
    "train": "mmalign.training.run",
    "TrainingInterrupted": "mmalign.training.signals",
    "TrainingStopped": "mmalign.training.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (a process that needs only one part, such
    as :mod:`~.host_memory`, does not import Accelerate and the towers)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmalign.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
