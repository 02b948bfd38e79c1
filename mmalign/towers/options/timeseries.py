"""The options of the ``type: timeseries`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.timeseries`
documents them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("timeseries")
class TimeSeriesTowerConfig(TowerConfig):
    """Config of ``type: timeseries`` (see the tower's module)."""

    channels: int = Field(default=1, ge=1)
    """Channels of every signal (``len(columns)`` when ``columns`` is set)."""
    columns: list[str] | None = Field(default=None, min_length=1)
    """CSV column names read as the channels, in order (a missing column: a missing channel)."""
    npz_key: str | None = None
    """The npz array read as the signal; ``None``: the npz's single array."""
    sample_rate: int | None = Field(default=None, gt=0)
    """Rate (Hz) signals given with their own rate are resampled to; ``None``: no resampling."""
    window: int = Field(default=256, ge=1)
    """Samples per item: longer signals are cropped, shorter ones padded (as missing)."""
    encoder: Literal["resnet", "patch", "hf"] = "resnet"
    """``resnet``, ``patch`` (PatchTST-like) or ``hf`` (transformers' PatchTST)."""
    path: str | None = None
    """``encoder: hf``: a local folder with a PatchTST ``config.json`` (and weights); ``None``:
    a PatchTST built from this config's fields."""
    width: int = Field(default=128, ge=1)
    """Output size of the tower (``hf`` with ``path``: the model's ``d_model``)."""
    resnet_channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    """``resnet``: channels of the residual blocks (each halves the length)."""
    patch: int = Field(default=16, ge=1)
    """``patch``, ``hf``: samples per patch (must divide ``window``)."""
    layers: int = Field(default=2, ge=1)
    """``patch``, ``hf``: transformer blocks."""
    heads: int = Field(default=4, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    normalize: Literal["none", "fit"] = "none"
    """``fit``: ``mmalign train`` standardizes each channel with its mean and std over the
    first ``normalize_records`` training records (NaN ignored); ``none``: 0 and 1."""
    normalize_records: int = Field(default=1000, ge=1)
    """Training records read (in shard order) to fit the statistics."""

    @model_validator(mode="after")
    def _check(self) -> TimeSeriesTowerConfig:
        if self.columns is not None:
            if "channels" in self.model_fields_set and self.channels != len(self.columns):
                raise ValueError(f"channels {self.channels} != len(columns) {len(self.columns)}")
            self.channels = len(self.columns)
        if self.path is not None and self.encoder != "hf":
            raise ValueError("'path' is only used with encoder: hf")
        if self.encoder == "patch" or (self.encoder == "hf" and self.path is None):
            if self.window % self.patch:
                raise ValueError(f"patch {self.patch} must divide window {self.window}")
            if self.width % self.heads:
                raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.encoder == "hf" and self.path is None and self.patch == self.window:
            raise ValueError(f"encoder hf: patch {self.patch} must be shorter than window")
        return self
