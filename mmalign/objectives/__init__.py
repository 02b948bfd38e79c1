"""Contrastive objectives: ``clip``, ``anchored``, ``sigmoid`` and ``symile``.

``build_objective(config)`` returns an ``nn.Module`` called as
``objective(embeddings, logit_scale, logit_bias=None, present=None, generator=None)`` and
returning a :class:`LossOutput`; ``objective.score(queries, candidates)`` is the similarity it
trains (zero-shot, validation and search use it). Each objective has its own config class
(``config_class``) and is found by name in the open registry :data:`mmalign.registry.OBJECTIVES`;
:func:`register_objective` adds one. Averaging, missing modalities and multi-process semantics
are described in :mod:`mmalign.objectives.base` and :mod:`mmalign.objectives.distributed`.

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

from mmalign.objectives import anchored, clip, sigmoid, symile  # noqa: F401  (registration)
from mmalign.objectives.anchored import AnchoredConfig
from mmalign.objectives.base import (
    LossOutput,
    Objective,
    PairTermsConfig,
    PairwiseConfig,
    build_objective,
    register_objective,
)
from mmalign.objectives.symile import SymileConfig

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
