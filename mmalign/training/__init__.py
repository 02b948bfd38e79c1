"""Training: :func:`train` runs the Accelerate loop; ``mmalign.train`` is the same function.

- :mod:`mmalign.training.run`: :func:`train` and the run directory (lock, resume, result);
- :mod:`mmalign.training.trainer`: the step loop (:class:`~.trainer.Trainer`);
- :mod:`mmalign.training.accumulation`, :mod:`~.stream`, :mod:`~.validation`,
  :mod:`~.checkpoint`, :mod:`~.logging`, :mod:`~.optim`, :mod:`~.checks`, :mod:`~.timing`,
  :mod:`~.health` (diverged weights), :mod:`~.resume` (what may change on resume),
  :mod:`~.signals` (SIGTERM/SIGINT), :mod:`~.shared_output` (a run directory every node
  sees), :mod:`~.sample_keys` (``train.log_sample_keys``): its parts.

Example:
    >>> from mmalign.training import train
    >>> result = train("run.yaml", ["train.steps=20"])  # doctest: +SKIP
    >>> result.steps  # doctest: +SKIP
    20
"""

from mmalign.training.run import TrainResult, train
from mmalign.training.signals import TrainingInterrupted
from mmalign.training.trainer import TrainingStopped

__all__ = ["TrainResult", "TrainingInterrupted", "TrainingStopped", "train"]
