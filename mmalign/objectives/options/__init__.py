"""The options of every built-in objective (its ``ObjectiveConfig`` subclass), one module per
objective, importing neither torch nor the losses: importing this package fills
:data:`~mmalign.registry.OBJECTIVE_OPTIONS`, so ``model.objective`` is validated (and a typo
reported) before the objectives load. An objective's own module imports its options class as
its ``config_class``; an objective registered from outside with
:func:`~mmalign.objectives.register_objective` registers its options with it.

Example:
    >>> from mmalign.registry import OBJECTIVE_OPTIONS
    >>> OBJECTIVE_OPTIONS.get("symile").model_validate({"name": "symile"}).negatives
    'n'
"""

from mmalign.objectives.options import anchored, pairwise, sigmoid, symile  # noqa: F401  (fill OBJECTIVE_OPTIONS)
