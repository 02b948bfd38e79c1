"""The options of the objectives with one term per pair of modalities (``clip``, and the base
of ``anchored`` and ``sigmoid``), apart from the losses so a config is checked without
importing torch; :mod:`mmalign.objectives.clip` documents them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import PositiveInt

from mmalign.config import field_error
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.registry import OBJECTIVE_OPTIONS


def pair_name(pair: tuple[str, str]) -> str:
    """A pair's term name, the key of its weight: ``"image-text"``."""
    return f"{pair[0]}-{pair[1]}"


class PairTermsConfig(PositivesConfig):
    """Config of an objective with one term per pair of modalities; the subclass says which
    pairs (:class:`PairwiseConfig`: the listed ones or all, ``anchored``: the anchor's)."""

    tile: Literal["auto", "none"] | PositiveInt = "auto"
    """Exact tiled loss (:mod:`mmalign.objectives.tiled`): ``auto`` tiles from a global batch
    of 2048 rows on, ``none`` builds the dense ``B x B`` logits, an integer is the tile size
    (memory ``O(B d + tile^2)`` instead of ``O(B^2)``)."""

    def resolve_pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        """The pairs of ``modalities`` that get a term."""
        raise NotImplementedError

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        return [pair_name(pair) for pair in self.resolve_pairs(modalities)]


@OBJECTIVE_OPTIONS.register("clip")
class PairwiseConfig(PairTermsConfig):
    """Config of an objective with one term per pair of modalities."""

    pairs: list[tuple[str, str]] | None = None
    """Pairs of modalities to train; ``None`` means every pair."""

    def resolve_pairs(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        """The configured pairs, or every pair of ``modalities``."""
        if self.pairs is None:
            return [
                (first, second)
                for index, first in enumerate(modalities)
                for second in modalities[index + 1 :]
            ]
        return list(self.pairs)

    def check_modalities(self, modalities: Sequence[str]) -> None:
        for pair in self.pairs or []:
            if pair[0] == pair[1] or any(name not in modalities for name in pair):
                raise field_error(
                    type(self).__name__,
                    "pairs",
                    f"{list(pair)} needs two different modalities among {list(modalities)}; "
                    "fix the pair or the model's towers",
                    self.pairs,
                )
        super().check_modalities(modalities)
