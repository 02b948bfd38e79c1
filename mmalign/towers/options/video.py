"""The options of the ``type: video`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.video`
documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("video")
class VideoTowerConfig(TowerConfig):
    """Config of ``type: video`` (see the tower's module)."""

    frames: int = Field(default=8, ge=1)
    """Frames sampled per clip."""
    fps: float | None = Field(default=None, gt=0)
    """Sampling rate of the frames (a window of ``frames / fps`` seconds); ``None``: spread
    over the whole clip."""
    encoder: Literal["frames", "conv3d"] = "frames"
    image: dict[str, Any] = Field(default_factory=dict)
    """``frames``: the per-frame image tower's config (the keys of ``type: image``)."""
    temporal: Literal["mean", "transformer"] = "mean"
    """``frames``: how frame vectors become one vector."""
    temporal_layers: int = Field(default=1, ge=1)
    """``temporal: transformer``: its blocks."""
    heads: int = Field(default=4, ge=1)
    """``temporal: transformer``: attention heads (must divide the image tower's width)."""
    image_size: int = Field(default=64, ge=1)
    """``conv3d``: side of the square frames (resize + centre crop, as the image tower)."""
    conv_channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    """``conv3d``: channels of the 3-D conv blocks."""
    width: int = Field(default=128, ge=1)
    """``conv3d``: output size."""

    @model_validator(mode="after")
    def _check(self) -> VideoTowerConfig:
        if self.encoder == "frames" and not self.image:
            raise ValueError("encoder 'frames' needs 'image:' (a type: image tower config)")
        if self.encoder == "conv3d" and self.image:
            raise ValueError("'image' is only used with encoder: frames")
        return self
