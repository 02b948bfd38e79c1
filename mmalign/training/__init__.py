"""Training: :func:`train` runs the Accelerate loop; ``mmalign.train`` is the same function.

Example:
    >>> from mmalign.training import train
    >>> result = train("run.yaml", ["train.steps=20"])  # doctest: +SKIP
    >>> result.steps  # doctest: +SKIP
    20
"""

from mmalign.training.loop import TrainingStopped, TrainResult, train

__all__ = ["TrainResult", "TrainingStopped", "train"]
