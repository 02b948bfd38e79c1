"""Importing this module registers the built-in towers in :data:`~mmalign.registry.TOWERS`
(the registry imports it on its first look-up); ``graph`` is registered deferred, as its
module imports torch_geometric."""

from mmalign.registry import TOWERS
from mmalign.towers import audio, image, tabular, text, timeseries, video  # noqa: F401  (fill TOWERS)

TOWERS.register_deferred("graph", "mmalign.towers.graph")  # torch_geometric: imported on use
