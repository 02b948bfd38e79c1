"""The options of ``name: anchored`` (``model.objective``), apart from the loss so a config is
checked without importing torch; :mod:`mmalign.objectives.anchored` documents them."""

from __future__ import annotations

from collections.abc import Sequence

from mmalign.config import field_error
from mmalign.objectives.options.pairwise import PairTermsConfig
from mmalign.registry import OBJECTIVE_OPTIONS


@OBJECTIVE_OPTIONS.register("anchored")
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
