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

from mmalign.config import field_error
from mmalign.objectives.base import PairTermsConfig, register_objective
from mmalign.objectives.clip import ClipObjective


class AnchoredConfig(PairTermsConfig):
    """``anchored``: every other modality is paired with ``anchor``."""

    anchor: str
    """The modality every other one is aligned to (ImageBind's image)."""

    def resolve_pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        """``(anchor, other)`` for every other modality."""
        return [(self.anchor, other) for other in modalities if other != self.anchor]

    def check_modalities(self, modalities: Sequence[str]) -> None:
        if self.anchor not in modalities or len(modalities) < 2:
            raise field_error(
                type(self).__name__,
                "anchor",
                f"{self.anchor!r} is not one of the modalities {list(modalities)}; the "
                "'anchored' objective needs one of them (and at least two modalities)",
                self.anchor,
            )
        super().check_modalities(modalities)


@register_objective("anchored")
class AnchoredObjective(ClipObjective):
    """Symmetric InfoNCE of the anchor modality with every other modality."""

    config_class = AnchoredConfig
