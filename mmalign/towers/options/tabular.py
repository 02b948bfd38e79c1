"""The options of the ``type: tabular`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.tabular`
documents them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("tabular")
class TabularTowerConfig(TowerConfig):
    """Config of ``type: tabular``."""

    in_features: int = Field(ge=1)
    """Length of every input vector."""
    hidden: int = Field(default=128, ge=1)
    """Width of every MLP layer, and of the tower's output."""
    layers: int = Field(default=2, ge=1)
    """Linear layers in the MLP (GELU between them)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    normalize: Literal["none", "fit"] = "none"
    """``fit``: ``mmalign train`` standardizes with the mean and std of each feature over
    the first ``normalize_records`` training records (NaN entries ignored); ``none``: the
    buffers stay as they are (0 and 1, or as loaded)."""
    normalize_records: int = Field(default=1000, ge=1)
    """Training records read (in shard order) to fit the statistics."""
    augment_feature_mask: float = Field(default=0.0, ge=0, lt=1)
    """Train-time feature masking: ``floor(r * in_features)`` random features of each sample
    are marked missing (NaN), at least one observed value is kept (the ``two_view`` term's
    augmentation for tables)."""
