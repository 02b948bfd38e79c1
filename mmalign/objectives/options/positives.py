"""The ``model.objective.positives`` options every built-in objective shares, apart from the
losses (:mod:`mmalign.objectives.positives`, which documents the modes) so a config is checked
without importing torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmalign.config import ObjectiveConfig

PositivesMode = Literal["instance", "multi", "exclude", "debiased"]


class PositivesConfig(ObjectiveConfig):
    """The positives fields every built-in objective shares."""

    positives: PositivesMode = "instance"
    """``instance``, ``multi``, ``exclude`` (same-group rows) or ``debiased`` (no groups)."""
    tau_plus: float = Field(default=0.1, ge=0.0, lt=1.0)
    """``debiased``: the prior probability that a random negative shares the query's class."""
    hard_negatives: bool = False
    """Pairwise objectives: in direction ``a -> b`` every row that has ``b`` is a candidate,
    so the rows ``data.negatives`` adds (mined negatives with only ``b``) and records missing
    ``a`` count as extra negatives; without it candidates are the rows with both."""
