"""``anchored``: symmetric InfoNCE between one ``anchor`` modality and each other one
(ImageBind). Terms are named ``"<anchor>-<other>"``; ``pairs`` is not used.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "anchored", "anchor": "image"})
    >>> batch = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ...          for m in ("text", "image", "audio")}
    >>> sorted(objective(batch, torch.tensor(10.0)).metrics)
    ['logit_scale', 'loss', 'loss/image-audio', 'loss/image-text']
"""

from __future__ import annotations

from mmalign.objectives.base import register_objective
from mmalign.objectives.clip import ClipObjective
from mmalign.objectives.options.anchored import AnchoredConfig


@register_objective("anchored")
class AnchoredObjective(ClipObjective):
    """Symmetric InfoNCE of the anchor modality with every other modality."""

    config_class = AnchoredConfig
