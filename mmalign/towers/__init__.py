"""Modality towers behind one registry: a config's ``type:`` picks the class.

Built-in types: ``image`` (open_clip vision encoders), ``text`` (Hugging Face or open_clip
text transformers), ``audio``, ``graph`` (torch_geometric), ``tabular``, ``timeseries`` and
``video``.

Example:
    >>> from mmalign.towers import TOWERS
    >>> [name for name in ("audio", "graph", "image", "tabular", "text") if name in TOWERS]
    ['audio', 'graph', 'image', 'tabular', 'text']
"""

from mmalign.registry import TOWERS
from mmalign.towers import audio, image, tabular, text, timeseries, video  # noqa: F401  (fill TOWERS)
from mmalign.towers.base import HFParts, Tower, build_tower, register_tower

TOWERS.register_deferred("graph", "mmalign.towers.graph")  # torch_geometric: imported on use

__all__ = ["TOWERS", "HFParts", "Tower", "build_tower", "register_tower"]
