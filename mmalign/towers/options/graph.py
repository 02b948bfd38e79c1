"""The options of the ``type: graph`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.graph`
documents them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("graph")
class GraphTowerConfig(TowerConfig):
    """Config of ``type: graph`` (see the tower's module)."""

    encoder: Literal["gin", "gcn", "gat"] = "gin"
    in_features: int = Field(ge=1)
    """Node feature width (``x`` is ``[N, in_features]``)."""
    edge_features: int | None = Field(default=None, ge=1)
    """Edge feature width (``edge_attr`` is ``[E, edge_features]``); ``None``: no edge features."""
    hidden: int = Field(default=64, ge=1)
    """Width of every GNN layer and of the tower's output."""
    layers: int = Field(default=3, ge=1)
    heads: int = Field(default=4, ge=1)
    """``gat``: attention heads (must divide ``hidden``)."""
    norm: Literal["batch_norm", "layer_norm", "none"] = "batch_norm"
    """Normalization between layers; ``layer_norm`` normalizes each node's features."""
    pooling: Literal["mean", "add", "max", "attention"] = "mean"
    dropout: float = Field(default=0.0, ge=0, lt=1)
    augment_node_drop: float = Field(default=0.0, ge=0, lt=1)
    augment_edge_perturb: float = Field(default=0.0, ge=0, le=1)
    augment_attr_mask: float = Field(default=0.0, ge=0, le=1)
    augment_subgraph: float = Field(default=0.0, ge=0, lt=1)
    augment_pick_one: bool = False
    """Apply one enabled augmentation chosen at random per call instead of all of them."""

    @model_validator(mode="after")
    def _check(self) -> GraphTowerConfig:
        if self.encoder == "gat" and self.hidden % self.heads:
            raise ValueError(f"gat: hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.encoder == "gcn" and self.edge_features not in (None, 1):
            raise ValueError(
                "gcn takes one scalar weight per edge: set edge_features to 1, or use gin/gat"
            )
        return self
