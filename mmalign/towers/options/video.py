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
    encoder: Literal["frames", "conv3d", "hf"] = "frames"
    """``frames`` (an image tower per frame), ``conv3d`` or ``hf`` (transformers' VideoMAE)."""
    path: str | None = None
    """``encoder: hf``: a local folder with a VideoMAE ``config.json``, its video processor
    (and weights); ``None``: a VideoMAE built from this config's fields."""
    image: dict[str, Any] = Field(default_factory=dict)
    """``frames``: the per-frame image tower's config (the keys of ``type: image``)."""
    temporal: Literal["mean", "transformer"] = "mean"
    """``frames``: how frame vectors become one vector."""
    temporal_layers: int = Field(default=1, ge=1)
    """``temporal: transformer``: its blocks."""
    heads: int = Field(default=4, ge=1)
    """``temporal: transformer``: attention heads (must divide the image tower's width);
    ``hf``: VideoMAE's."""
    image_size: int = Field(default=64, ge=1)
    """``conv3d``, ``hf``: side of the square frames (resize + centre crop)."""
    patch_size: int = Field(default=16, ge=1)
    """``hf`` from scratch: pixels per side of a patch (must divide ``image_size``)."""
    tubelet_size: int = Field(default=2, ge=1)
    """``hf`` from scratch: frames per patch (must divide ``frames``)."""
    layers: int = Field(default=2, ge=1)
    """``hf`` from scratch: transformer blocks."""
    conv_channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    """``conv3d``: channels of the 3-D conv blocks."""
    width: int = Field(default=128, ge=1)
    """``conv3d``, ``hf`` from scratch: output size."""

    @model_validator(mode="after")
    def _check(self) -> VideoTowerConfig:
        if self.encoder == "frames" and not self.image:
            raise ValueError("encoder 'frames' needs 'image:' (a type: image tower config)")
        if self.encoder != "frames" and self.image:
            raise ValueError("'image' is only used with encoder: frames")
        if self.encoder != "hf" and self.path is not None:
            raise ValueError("'path' is only used with encoder: hf")
        if self.encoder == "hf" and self.path is None:
            for whole, part in (("image_size", "patch_size"), ("frames", "tubelet_size")):
                size, piece = getattr(self, whole), getattr(self, part)
                if size % piece:
                    raise ValueError(f"encoder hf: {part} {piece} must divide {whole} {size}")
            if self.width % self.heads:
                raise ValueError(f"encoder hf: heads {self.heads} must divide width {self.width}")
        return self
