"""The options of the ``type: audio`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.audio`
documents them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS


@TOWER_OPTIONS.register("audio")
class AudioTowerConfig(TowerConfig):
    """Config of ``type: audio`` (see the tower's module)."""

    encoder: Literal["transformer", "cnn", "hf"] = "transformer"
    """``transformer`` (spectrogram transformer), ``cnn``, or ``hf`` (a local HF model)."""
    path: str | None = None
    """``encoder: hf``: local directory with the model's config, weights and feature extractor."""
    sample_rate: int = Field(default=16000, gt=0)
    """Rate (Hz) waveforms are resampled to (``hf``: the feature extractor's rate is used)."""
    clip_seconds: float = Field(default=2.0, gt=0)
    """Clips are cropped or zero-padded to this duration."""
    augment_gain_db: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Train-time gain: each clip scaled by a uniform random gain in ``[-g, +g]`` dB."""
    augment_time_mask: float = Field(default=0.0, ge=0, lt=1)
    """Train-time time masking: a random span of up to ``r`` of the clip set to silence
    (SpecAugment's time mask, on the waveform)."""
    augment_freq_mask: float = Field(default=0.0, ge=0, lt=1)
    """Train-time frequency masking (SpecAugment): a random band of up to ``r * n_mels``
    consecutive mel bins set to the clip's mean (0 after the per-clip standardization). The
    band is drawn in ``preprocess`` (the loader's seeded workers; item key ``mel_keep``) and
    applied to the log-mel in ``forward``; ``transformer`` and ``cnn`` encoders only."""
    n_mels: int = Field(default=64, ge=1)
    n_fft: int = Field(default=400, ge=2)
    """FFT size in samples (400 = 25 ms at 16 kHz)."""
    win_length: int | None = Field(default=None, ge=2)
    """Hann window length in samples (``None``: ``n_fft``)."""
    hop_length: int = Field(default=160, ge=1)
    """Frame step in samples (160 = 10 ms at 16 kHz)."""
    f_min: float = Field(default=0.0, ge=0)
    f_max: float | None = None
    """Highest mel frequency in Hz (``None``: ``sample_rate / 2``)."""
    mel_scale: Literal["htk", "slaney"] = "htk"
    mel_norm: Literal["none", "slaney"] = "none"
    """``slaney``: area-normalize the mel filters."""
    log_floor: float = Field(default=1e-6, gt=0)
    """Mel energies are clamped to this value before the log."""
    width: int = Field(default=128, ge=1)
    """Output size of the ``transformer`` and ``cnn`` encoders."""
    layers: int = Field(default=2, ge=1)
    """Transformer blocks."""
    heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    patch_freq: int = Field(default=16, ge=1)
    """Mel bins per patch (must divide ``n_mels``)."""
    patch_time: int = Field(default=8, ge=1)
    """Frames per patch."""
    pooling: Literal["mean", "cls"] = "mean"
    """Transformer pooling: masked mean over real patches, or a learned CLS token."""
    cnn_channels: list[int] = Field(default_factory=lambda: [32, 64])
    """Channels of the CNN's hidden conv layers; a last conv layer maps to ``width``."""
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> AudioTowerConfig:
        if self.encoder == "hf" and self.path is None:
            raise ValueError("encoder 'hf' needs 'path:' (a local Hugging Face model directory)")
        if self.encoder != "hf" and self.path is not None:
            raise ValueError("'path' is only used with encoder: hf")
        if self.encoder == "hf" and self.augment_freq_mask > 0:
            raise ValueError(
                "augment_freq_mask masks the log-mel of the transformer and cnn encoders; "
                "encoder hf has its own feature extractor"
            )
        if self.f_max is not None and not self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(
                f"f_max must lie in (f_min, sample_rate / 2] = ({self.f_min}, "
                f"{self.sample_rate / 2}], got {self.f_max}"
            )
        if (self.win_length or self.n_fft) > self.n_fft:
            raise ValueError(f"win_length {self.win_length} exceeds n_fft {self.n_fft}")
        if self.encoder == "transformer":
            if self.n_mels % self.patch_freq:
                raise ValueError(f"patch_freq {self.patch_freq} must divide n_mels {self.n_mels}")
            if self.width % self.heads:
                raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        return self
