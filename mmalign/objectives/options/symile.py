"""The options of ``name: symile`` (``model.objective``), apart from the loss so a config is
checked without importing torch; :mod:`mmalign.objectives.symile` documents them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from mmalign.config import field_error
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.registry import OBJECTIVE_OPTIONS


@OBJECTIVE_OPTIONS.register("symile")
class SymileConfig(PositivesConfig):
    """``symile``: which negatives, and the block size of the exact ``n2`` computation."""

    negatives: Literal["n", "n2"] = "n"
    """``n`` (shuffled rows, O(N)) or ``n2`` (all B^(M-1) combinations, exact, blockwise)."""
    tile: Literal["auto", "none"] | PositiveInt = "auto"
    """``n``: the exact tiled loss (:mod:`mmalign.objectives.symile_n`): ``auto`` tiles from a
    global batch of 2048 rows on, ``none`` builds the dense ``B x B`` logits per anchor, an
    integer is the tile size (memory ``O(B d + tile^2)`` instead of ``O(B^2)``)."""
    block_size: int = Field(default=16384, ge=1)
    """``n2``: rows of the B^(M-1) candidate set processed per block."""
    block_precision: Literal["fp32", "bf16"] | None = None
    """``n2``: dtype of the block matmuls (log-sum-exps and reductions stay float32). Unset:
    ``bf16`` when ``train.precision`` is ``bf16``, else ``fp32`` (see :meth:`follow_training`)."""

    def follow_training(self, precision: str) -> None:
        """An unset ``block_precision`` becomes ``bf16`` under ``train.precision: bf16``, else
        ``fp32``; a set one stays.

        Example:
            >>> config = SymileConfig(name="symile", negatives="n2")
            >>> config.follow_training("bf16")
            >>> config.block_precision
            'bf16'
        """
        if self.block_precision is None:
            self.block_precision = "bf16" if precision == "bf16" else "fp32"

    @model_validator(mode="after")
    def _no_hard_negatives(self) -> SymileConfig:
        if self.hard_negatives:
            raise field_error(
                type(self).__name__,
                "hard_negatives",
                "'symile' scores whole tuples and has no candidate column for a mined "
                "negative of one modality; use clip, anchored or sigmoid, or set it false",
                self.hard_negatives,
            )
        return self

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        return list(modalities)

    def check_modalities(self, modalities: Sequence[str]) -> None:
        if len(modalities) < 2:
            raise field_error(
                type(self).__name__,
                "name",
                f"'symile' needs at least two modalities, the model has {list(modalities)}; "
                "add a tower to model.towers",
                self.name,
            )
        super().check_modalities(modalities)
