"""The options of the ``type: image`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.image`
documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("image")
class ImageTowerConfig(TowerConfig):
    """Config of ``type: image`` (see :mod:`mmalign.towers.image`)."""

    type: Literal["image"] = "image"
    model: str | None = None
    vision_cfg: dict[str, Any] = Field(default_factory=dict)
    image_size: int | None = None
    embed_dim: int | None = None
    quick_gelu: bool | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    preprocess: dict[str, Any] = Field(default_factory=dict)
    augmentation: dict[str, Any] = Field(default_factory=dict)
