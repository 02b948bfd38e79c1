"""The options of every built-in tower (its ``TowerConfig`` subclass), one module per tower,
importing neither torch nor the towers: importing this package fills
:data:`~mmalign.registry.TOWER_OPTIONS`, so ``model.towers`` is validated (and a typo
reported) before the towers load. A tower's own module imports its options class as its
``config_class``; a tower registered from outside with
:func:`~mmalign.towers.register_tower` registers its options with it.

Example:
    >>> from mmalign.registry import TOWER_OPTIONS
    >>> TOWER_OPTIONS.get("tabular").model_validate({"type": "tabular", "in_features": 3}).hidden
    128
"""

from mmalign.towers.options import audio, graph, image, tabular, text, timeseries, video  # noqa: F401  (fill TOWER_OPTIONS)
