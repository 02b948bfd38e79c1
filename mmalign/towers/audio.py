"""The audio tower (``type: audio``): waveforms to vectors.

Raw samples are ``(waveform, sample_rate)`` tuples (``[T]`` or ``[channels, T]``, mixed to
mono) or wav/flac paths. ``preprocess`` resamples to the tower's rate
(``scipy.signal.resample_poly``) and crops every clip to ``clip_seconds`` (a random window
when augmenting, the centre window otherwise); shorter clips are zero-padded and carry their
real length, so every item has the same size and a sample's embedding never depends on the
other clips in its batch.

Encoders (``encoder:``):

- ``transformer``: an AST-style spectrogram transformer. The log-mel spectrogram
  (:class:`~mmalign.towers.log_mel.LogMel`, computed batched in ``forward`` on the model's
  device) is standardized per clip over its real frames, cut into ``patch_freq x patch_time``
  patches with learned positional embeddings; patches made only of padding are masked out of
  attention and pooling (``pooling: mean`` over real patches, or ``cls``).
- ``cnn``: strided 3x3 convolutions over the same log-mel, re-masked after every layer, then
  a masked global mean.
- ``hf``: a Hugging Face audio encoder from a local directory ``path`` (``AutoModel`` +
  ``AutoFeatureExtractor``: wav2vec2/HuBERT/WavLM, Whisper's encoder, AST, ...). Its feature
  extractor runs in ``preprocess`` instead of the log-mel; the hidden states are averaged over
  the frames the extractor's attention mask marks as real. ``sample_rate`` and the mel fields
  are then the extractor's own.

Example:
    >>> import numpy as np
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "audio", "clip_seconds": 0.5, "width": 32, "heads": 2})
    >>> item = tower.preprocess((np.zeros(8000, dtype=np.float32), 8000))
    >>> tower(tower.collate([item, item])).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from mmalign.config import ConfigError
from mmalign.towers.base import HFParts, Tower, register_tower
from mmalign.towers.grad_checkpointing import library_checkpointing
from mmalign.towers.hf_local import hf_folder, hf_model
from mmalign.towers.log_mel import ConvLogMel, LogMel
from mmalign.towers.options.audio import AudioTowerConfig
from mmalign.towers.waveform import load_waveform, resample

MAX_UPSAMPLING = 32
"""A clip whose rate is this many times below the tower's has a wrong header (a 1 Hz rate
would also blow a short clip up to hours of samples); ``preprocess`` rejects it."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, L, D]`` over the positions where ``mask [B, L]`` is True."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _positions_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def standardize_log_mel(log_mel: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Standardize each clip's ``[B, n_mels, F]`` log-mel with the mean and std of its real
    frames (``frame_mask [B, F]``); the encoders mask the padding frames out."""
    weights = frame_mask[:, None, :].to(log_mel.dtype)
    count = weights.sum((1, 2), keepdim=True) * log_mel.shape[1]
    mean = (log_mel * weights).sum((1, 2), keepdim=True) / count
    variance = ((log_mel - mean).square() * weights).sum((1, 2), keepdim=True) / count
    return (log_mel - mean) / (variance.sqrt() + 1e-5)


class SpectrogramTransformer(nn.Module):
    """AST-style transformer over ``[B, n_mels, frames]`` with a per-clip frame count."""

    def __init__(self, config: AudioTowerConfig, n_frames: int) -> None:
        super().__init__()
        self.patch_time = config.patch_time
        self.time_patches = math.ceil(n_frames / config.patch_time)
        self.freq_patches = config.n_mels // config.patch_freq
        patch = (config.patch_freq, config.patch_time)
        self.embed = nn.Conv2d(1, config.width, kernel_size=patch, stride=patch)
        self.cls = (
            nn.Parameter(torch.zeros(1, 1, config.width)) if config.pooling == "cls" else None
        )
        tokens = self.time_patches * self.freq_patches + (self.cls is not None)
        self.position = nn.Parameter(torch.randn(1, tokens, config.width) * 0.02)
        block = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            int(config.width * config.mlp_ratio),
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        features = features * _positions_mask(frame_lengths, features.shape[-1])[:, None, :]
        padding = self.time_patches * self.patch_time - features.shape[-1]
        tokens = self.embed(nn.functional.pad(features, (0, padding)).unsqueeze(1))
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, freq * time patches, width]
        patch_lengths = torch.div(
            frame_lengths + self.patch_time - 1, self.patch_time, rounding_mode="floor"
        )
        valid = _positions_mask(patch_lengths, self.time_patches).repeat(1, self.freq_patches)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
            valid = nn.functional.pad(valid, (1, 0), value=True)
        hidden = self.norm(self.blocks(tokens + self.position, src_key_padding_mask=~valid))
        return hidden[:, 0] if self.cls is not None else _masked_mean(hidden, valid)


class SpectrogramCNN(nn.Module):
    """Stride-2 3x3 convolutions over ``[B, n_mels, frames]``, masked after each layer, then a
    masked global mean."""

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        channels = [1, *config.cnn_channels, config.width]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            for c_in, c_out in itertools.pairwise(channels)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        lengths = frame_lengths
        hidden = _zero_padding_frames(features.unsqueeze(1), lengths)
        for conv in self.convs:
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")  # ceil(length / 2)
            hidden = _zero_padding_frames(self.dropout(nn.functional.gelu(conv(hidden))), lengths)
        return hidden.sum((2, 3)) / (lengths[:, None] * hidden.shape[2])


def _zero_padding_frames(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero the time steps (last axis of ``[B, C, F, T]``) at or past each sample's length."""
    return hidden * _positions_mask(lengths, hidden.shape[-1])[:, None, None, :]


class HFAudioEncoder(nn.Module):
    """A Hugging Face audio model (encoder only) pooled by a masked mean over its frames."""

    def __init__(self, model: PreTrainedModel, pass_attention_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.pass_attention_mask = pass_attention_mask

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        arguments = {k: v for k, v in inputs.items() if k != "attention_mask"}
        if mask is not None and self.pass_attention_mask:
            arguments["attention_mask"] = mask
        hidden = self.model(**arguments).last_hidden_state
        if mask is None:
            return hidden.mean(1)
        return _masked_mean(
            hidden, _positions_mask(self._output_lengths(mask, hidden), hidden.shape[1])
        )

    def _output_lengths(self, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(-1)
        output_lengths = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if output_lengths is not None:
            lengths = output_lengths(lengths)
        else:  # proportional: the encoder keeps time order at a fixed downsampling
            lengths = torch.ceil(lengths * hidden.shape[1] / mask.shape[-1])
        return lengths.long().clamp(1, hidden.shape[1])


def augment_clip(clip: np.ndarray, gain_db: float, time_mask: float) -> np.ndarray:
    """``clip`` scaled by a uniform random gain in ``[-gain_db, gain_db]`` dB, with a random
    span of up to ``time_mask`` of its samples silenced (torch's generator).

    Example:
        >>> out = augment_clip(np.ones(100, dtype=np.float32), 6.0, 0.5)
        >>> bool(0.5 <= out.max() <= 2.0), int((out == 0).sum()) <= 50
        (True, True)
    """
    out = clip
    if gain_db > 0:
        decibels = (torch.rand(()) * 2 - 1) * gain_db
        out = out * np.float32(10 ** (float(decibels) / 20))
    if time_mask > 0 and len(out):
        width = int(torch.randint(int(time_mask * len(out)) + 1, ()))
        start = int(torch.randint(len(out) - width + 1, ()))
        out = out.copy() if out is clip else out
        out[start : start + width] = 0.0
    return out


def frequency_band_mask(n_mels: int, ratio: float) -> torch.Tensor:
    """``BoolTensor[n_mels]``: False on a random band of up to ``floor(ratio * n_mels)``
    consecutive mel bins (SpecAugment's frequency mask: width ``f ~ U{0..F}``, start
    ``f0 ~ U{0..n_mels - f}``; torch's generator), True elsewhere.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> keep = frequency_band_mask(64, 0.25)
        >>> keep.shape, int((~keep).sum()) <= 16
        (torch.Size([64]), True)
    """
    width = int(torch.randint(int(ratio * n_mels) + 1, ()))
    start = int(torch.randint(n_mels - width + 1, ()))
    keep = torch.ones(n_mels, dtype=torch.bool)
    keep[start : start + width] = False
    return keep


@register_tower("audio")
class AudioTower(Tower):
    """Audio tower: ``(waveform, sample_rate)`` or a wav/flac path to ``[B, width]``.

    Items are dicts of fixed-size tensors (``waveform`` + ``length``, or the HF feature
    extractor's outputs); ``collate`` stacks them.

    Example:
        >>> import numpy as np
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "audio", "encoder": "cnn", "clip_seconds": 0.25})
        >>> tower.preprocess((np.ones(1000), 8000))["length"]
        tensor(2000)
    """

    config: AudioTowerConfig
    config_class = AudioTowerConfig

    def __init__(
        self, config: AudioTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        if config.encoder == "hf":
            self._init_hf(config)
            return
        self.sample_rate = config.sample_rate
        self.clip_samples = round(config.clip_seconds * config.sample_rate)
        if self.clip_samples <= config.n_fft // 2:
            raise ConfigError(
                f"{field}.clip_seconds: {config.clip_seconds} s is shorter than half an FFT "
                f"window (n_fft {config.n_fft}); raise clip_seconds or lower n_fft"
            )
        self.log_mel = LogMel(
            config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            win_length=config.win_length,
            f_min=config.f_min,
            f_max=config.f_max,
            mel_scale=config.mel_scale,
            slaney_norm=config.mel_norm == "slaney",
            log_floor=config.log_floor,
        )
        n_frames = self.clip_samples // config.hop_length + 1
        if config.encoder == "transformer":
            self.encoder: nn.Module = SpectrogramTransformer(config, n_frames)
        else:
            self.encoder = SpectrogramCNN(config)
        self.width = config.width

    def _init_hf(self, config: AudioTowerConfig) -> None:
        from transformers import AutoFeatureExtractor

        directory = hf_folder(self)
        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{self.field}.path: no feature extractor in {directory} "
                f"(save one with feature_extractor.save_pretrained(dir)): {error}"
            ) from error
        model = hf_model(self, directory, None)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.encoder = HFAudioEncoder(
            model, bool(getattr(self.feature_extractor, "return_attention_mask", False))
        )
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.clip_samples = round(config.clip_seconds * self.sample_rate)
        self.width = int(model.config.hidden_size)

    def preprocess(self, raw: Any, augment: bool = False) -> dict[str, torch.Tensor]:
        """Load, mix to mono, resample, crop/pad to ``clip_seconds`` (``augment``: a random
        window of a longer clip, else the centre one, then the gain and time mask of
        :func:`augment_clip` and the frequency band of :func:`frequency_band_mask`); ``hf``:
        run the feature extractor."""
        waveform, sample_rate = load_waveform(raw)
        if sample_rate * MAX_UPSAMPLING < self.sample_rate:
            raise ValueError(
                f"{self.field}: sample rate {sample_rate} Hz is implausibly low for a tower at "
                f"{self.sample_rate} Hz (over {MAX_UPSAMPLING}x upsampling); check the clip's "
                "rate or the tower's sample_rate"
            )
        clip = self._crop(resample(waveform, sample_rate, self.sample_rate), augment)
        if augment:
            clip = augment_clip(clip, self.config.augment_gain_db, self.config.augment_time_mask)
        if self.config.encoder == "hf":
            return self._extract(clip)
        padded = np.zeros(self.clip_samples, dtype=np.float32)
        padded[: len(clip)] = clip
        item = {"waveform": torch.from_numpy(padded), "length": torch.tensor(len(clip))}
        if augment and self.config.augment_freq_mask > 0:
            item["mel_keep"] = frequency_band_mask(
                self.config.n_mels, self.config.augment_freq_mask
            )
        return item

    def _crop(self, waveform: np.ndarray, augment: bool) -> np.ndarray:
        excess = len(waveform) - self.clip_samples
        if excess <= 0:
            return waveform
        start = int(torch.randint(excess + 1, ())) if augment else excess // 2
        return waveform[start : start + self.clip_samples]

    def _extract(self, clip: np.ndarray) -> dict[str, torch.Tensor]:
        # Pad every clip to one size (a fixed-window extractor such as Whisper's keeps its own).
        features = self.feature_extractor(
            [clip],
            sampling_rate=self.sample_rate,
            padding="max_length",
            max_length=getattr(self.feature_extractor, "n_samples", self.clip_samples),
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return {key: torch.from_numpy(np.asarray(value[0])) for key, value in features.items()}

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.encoder == "hf":
            return self.encoder(inputs)
        frame_lengths = self.log_mel.frame_lengths(inputs["length"])
        log_mel = self.log_mel(inputs["waveform"])
        frame_mask = _positions_mask(frame_lengths, log_mel.shape[-1])
        features = standardize_log_mel(log_mel, frame_mask)
        if "mel_keep" in inputs:  # augment_freq_mask: the masked bands take the clip's mean
            features = features * inputs["mel_keep"][:, :, None].to(features.dtype)
        return self.encoder(features, frame_lengths)

    def enable_gradient_checkpointing(self) -> bool:
        """Each layer of the transformer, or the Hugging Face model's own switch (the CNN
        is left as it is: small activations, BatchNorm)."""
        return library_checkpointing(self)

    def example_raw(self) -> Any:
        """A random clip of ``clip_seconds`` at the tower's rate."""
        rng = np.random.default_rng(0)
        return (rng.standard_normal(self.clip_samples).astype(np.float32), self.sample_rate)

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """The log-mel as :class:`~mmalign.towers.log_mel.ConvLogMel` (no complex STFT)."""
        log_mel = getattr(self, "log_mel", None)
        if isinstance(log_mel, LogMel):
            self.log_mel = ConvLogMel(log_mel)  # type: ignore[assignment]
        try:
            yield
        finally:
            if isinstance(log_mel, LogMel):
                self.log_mel = log_mel

    def hf_parts(self) -> HFParts | None:
        """``encoder: hf``: the ``AutoModel``, its feature extractor, pooled over frames."""
        if not isinstance(self.encoder, HFAudioEncoder):
            return None
        return HFParts(self.encoder.model, self.feature_extractor, "frames")

    def save_files(self, directory: Path) -> dict[str, Any]:
        """``hf``: save the model config and feature extractor (not the weights, which live in
        the model's safetensors) so the tower rebuilds without the original directory."""
        if not isinstance(self.encoder, HFAudioEncoder):
            return {}
        self.encoder.model.config.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)
        return {"path": "."}
