"""Training: ``train(config)`` runs the Accelerate loop of :mod:`mmalign.train.loop`.

``mmalign.train`` is both this package and the public function: importing the package makes
it the attribute ``mmalign.train``, so the package itself is callable and calls :func:`train`.

Example:
    >>> import mmalign
    >>> result = mmalign.train("configs/demo_digits.yaml", ["train.steps=20"])  # doctest: +SKIP
    >>> result.steps  # doctest: +SKIP
    20
"""

import sys
import types
from typing import Any

from mmalign.train.loop import TrainingStopped, TrainResult, train

__all__ = ["TrainResult", "TrainingStopped", "train"]


class _CallablePackage(types.ModuleType):
    """``mmalign.train(...)`` works whether the name resolves to the function or the package."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
