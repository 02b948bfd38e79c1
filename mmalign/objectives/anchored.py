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

from collections.abc import Sequence

from mmalign.objectives.base import CONFIG_FIELD, register_objective
from mmalign.objectives.clip import ClipObjective


@register_objective("anchored")
class AnchoredObjective(ClipObjective):
    """Symmetric InfoNCE of the anchor modality with every other modality."""

    def pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        anchor = self.config.anchor
        if anchor not in modalities or len(modalities) < 2:
            raise ValueError(
                f"{CONFIG_FIELD}.anchor is {anchor!r}; the 'anchored' objective needs it set to "
                f"one of the batch's modalities {list(modalities)} (and at least two modalities)"
            )
        return [(anchor, other) for other in modalities if other != anchor]
