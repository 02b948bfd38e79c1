"""The options of ``name: sigmoid`` (``model.objective``), apart from the loss so a config is
checked without importing torch; :mod:`mmalign.objectives.sigmoid` documents them."""

from __future__ import annotations

from pydantic import model_validator

from mmalign.config import field_error
from mmalign.objectives.options.pairwise import PairwiseConfig
from mmalign.registry import OBJECTIVE_OPTIONS


@OBJECTIVE_OPTIONS.register("sigmoid")
class SigmoidConfig(PairwiseConfig):
    """``sigmoid``: the pairwise config; ``positives`` is ``instance``, ``multi`` or ``exclude``."""

    @model_validator(mode="after")
    def _binary_positives(self) -> SigmoidConfig:
        if self.positives == "debiased":
            raise field_error(
                type(self).__name__,
                "positives",
                "'debiased' corrects a softmax denominator and 'sigmoid' has none; use "
                "instance, multi or exclude",
                self.positives,
            )
        return self
