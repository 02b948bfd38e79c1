"""Modality towers behind one registry: a config's ``type:`` picks the class.

Built-in types: ``image`` (open_clip vision encoders), ``text`` (Hugging Face or open_clip
text transformers), ``audio``, ``graph`` (torch_geometric), ``tabular``, ``timeseries`` and
``video``. Importing this package loads nothing heavy: the towers (torch, open_clip) load on
the first use of a name below or of :data:`TOWERS` (:mod:`mmalign.towers.builtins`), and
their options (:mod:`mmalign.towers.options`) validate a config without them.

Example:
    >>> from mmalign.towers import TOWERS
    >>> [name for name in ("audio", "graph", "image", "tabular", "text") if name in TOWERS]
    ['audio', 'graph', 'image', 'tabular', 'text']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmalign.registry import TOWERS

if TYPE_CHECKING:
    from mmalign.towers.base import HFParts, Tower, build_tower, register_tower

__all__ = ["TOWERS", "HFParts", "Tower", "build_tower", "register_tower"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'mmalign.towers' has no attribute {name!r}")
    from mmalign.towers import base

    return getattr(base, name)
