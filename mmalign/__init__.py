"""mmalign: contrastive alignment of many modalities (CLIP, SigLIP, ImageBind, Symile).

The public API, imported lazily so that ``import mmalign`` stays fast:

    >>> import mmalign
    >>> sorted(mmalign.__all__)[:3]
    ['AlignmentModel', 'Batch', 'Config']
    >>> from importlib.metadata import version  # the version is the installed package's
    >>> mmalign.__version__ == version("mmalign")
    True
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import Any

_EXPORTS = {
    "AlignmentModel": "mmalign.model",
    "Batch": "mmalign.batch",
    "Config": "mmalign.config",
    "ConfigError": "mmalign.errors",
    "ObjectiveConfig": "mmalign.config",
    "TowerConfig": "mmalign.config",
    "load_config": "mmalign.config",
    "LossOutput": "mmalign.objectives",
    "Objective": "mmalign.objectives",
    "build_objective": "mmalign.objectives",
    "register_objective": "mmalign.objectives",
    "build_tower": "mmalign.towers.base",
    "Tower": "mmalign.towers.base",
    "register_tower": "mmalign.towers.base",
    "make_loader": "mmalign.data",
    "train": "mmalign.training",
    "ZeroShotClassifier": "mmalign.eval",
    "retrieval_metrics": "mmalign.eval",
    "embedding_diagnostics": "mmalign.eval",
    "export_embeddings": "mmalign.export",
    "build_index": "mmalign.export",
    "search": "mmalign.export",
}

__all__ = sorted(_EXPORTS)
__version__ = version("mmalign")  # the installed distribution's (pyproject.toml)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmalign' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
