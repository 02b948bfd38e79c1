"""Contrastive objectives: ``clip``, ``anchored``, ``sigmoid`` and ``symile``.

``build_objective(config)`` returns an ``nn.Module`` called as
``objective(embeddings, logit_scale, logit_bias=None, present=None, generator=None)`` and
returning a :class:`LossOutput`; ``objective.score(queries, candidates)`` is the similarity it
trains (zero-shot, validation and search use it). Each objective has its own config class
(``config_class``) and is found by name in the open registry :data:`mmalign.registry.OBJECTIVES`;
:func:`register_objective` adds one. Averaging, missing modalities and multi-process semantics
are described in :mod:`mmalign.objectives.base` and :mod:`mmalign.objectives.distributed`.
Importing this package loads nothing heavy: the objectives (torch) load on the first use of a
name below or of :data:`~mmalign.registry.OBJECTIVES` (:mod:`mmalign.objectives.builtins`),
and their options (:mod:`mmalign.objectives.options`) validate a config without them.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "symile", "negatives": "n2"})
    >>> batch = {m: torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    ...          for m in ("image", "text", "audio")}
    >>> present = torch.ones(8, 3, dtype=torch.bool)
    >>> present[0, 2] = False  # sample 0 has no audio
    >>> out = objective(batch, logit_scale=torch.tensor(10.0), present=present)
    >>> out.loss.shape, objective.config.negatives
    (torch.Size([]), 'n2')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmalign.objectives.base import LossOutput, Objective, build_objective, register_objective
    from mmalign.objectives.options.anchored import AnchoredConfig
    from mmalign.objectives.options.pairwise import PairTermsConfig, PairwiseConfig
    from mmalign.objectives.options.symile import SymileConfig

_MODULES = {
    "AnchoredConfig": "mmalign.objectives.options.anchored",
    "LossOutput": "mmalign.objectives.base",
    "Objective": "mmalign.objectives.base",
    "PairTermsConfig": "mmalign.objectives.options.pairwise",
    "PairwiseConfig": "mmalign.objectives.options.pairwise",
    "SymileConfig": "mmalign.objectives.options.symile",
    "build_objective": "mmalign.objectives.base",
    "register_objective": "mmalign.objectives.base",
}
"""Where each public name lives: importing this package (or its options) loads no torch."""

__all__ = [
    "AnchoredConfig",
    "LossOutput",
    "Objective",
    "PairTermsConfig",
    "PairwiseConfig",
    "SymileConfig",
    "build_objective",
    "register_objective",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'mmalign.objectives' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
