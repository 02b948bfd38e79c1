"""The time-series tower (``type: timeseries``): multichannel signals to vectors.

A raw sample is a ``[channels, T]`` array (``[T]`` for one channel), a ``(array,
sample_rate)`` tuple (resampled to the tower's ``sample_rate`` with
:func:`~mmalign.towers.waveform.resample`), or a mapping of column name -> values (a decoded
CSV, picked by ``columns``; a decoded npz: its single array, or the one ``npz_key`` names).
A channel that is all NaN (or a ``columns`` name the sample lacks) is *missing*: the encoders
see a 0/1 missing indicator beside every channel, as the tabular tower does for its features.
NaN inside an observed channel is a bad sample (``preprocess`` raises, the loader skips and
counts the record).

``preprocess`` crops every signal to ``window`` samples (a random window when augmenting, the
centre one otherwise); shorter signals are padded with NaN, which the encoders treat like a
missing value. ``forward`` standardizes each channel with the ``mean`` / ``std`` buffers
(``normalize: fit`` fits them from the first training records, as the tabular tower does;
:meth:`TimeSeriesTower.fit_normalization`).

Encoders (``encoder:``):

- ``resnet``: a 1-D ResNet (a stem convolution, then one residual block per entry of
  ``resnet_channels``, each halving the length; group norm, so gradient checkpointing can
  recompute a block), global average pooling, a linear map to ``width``.
- ``patch``: a PatchTST-style transformer. Each channel is cut into patches of ``patch``
  samples, embedded channel-independently (one shared linear map, plus a learned position and
  channel embedding); the tokens of missing channels are masked out of attention and pooling.
- ``hf``: transformers' ``PatchTSTModel``, from a local folder ``path`` (its weights, or only
  its config), else built from scratch from ``window``, ``patch``, ``width``, ``heads``,
  ``layers`` and ``dropout`` (layer norm, no input scaling, no input masking). The window,
  normalization and missing mask stay the tower's: the model takes the standardized signal
  with missing values set to 0 as ``past_values`` ``[B, T, C]`` and ``past_observed_mask``;
  its hidden states ``[B, C, patches, width]`` are averaged over each channel's patches, then
  over the channels with an observed value (PatchTST encodes each channel on its own, so a
  missing channel changes nothing else). ``mmalign convert --to hf`` writes it with the
  ``mean`` / ``std`` buffers (:meth:`TimeSeriesTower.hf_parts`).

Example:
    >>> import numpy as np
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "timeseries", "channels": 2, "window": 64, "width": 16})
    >>> tower(tower.collate([tower.preprocess(np.zeros((2, 100), np.float32))])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mmalign.errors import SampleError
from mmalign.towers.base import HFParts, Tower, register_tower
from mmalign.towers.hf_local import checked_size, hf_config, hf_folder, hf_model
from mmalign.towers.options.timeseries import TimeSeriesTowerConfig
from mmalign.towers.waveform import resample

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _group_norm(channels: int) -> nn.GroupNorm:
    """Group norm (up to 8 groups): per-sample statistics, so a block can be recomputed by
    gradient checkpointing and a batch of one trains."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock1d(nn.Module):
    """Two 1-D convolutions (kernel 3, the first of stride 2) with group norm and a shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm1 = _group_norm(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _group_norm(c_out)
        self.shortcut = nn.Conv1d(c_in, c_out, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.relu(self.norm1(self.conv1(x)))
        return nn.functional.relu(self.norm2(self.conv2(hidden)) + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem, residual blocks, global average pooling, linear map to ``width``."""

    def __init__(self, config: TimeSeriesTowerConfig) -> None:
        super().__init__()
        channels = config.resnet_channels
        self.stem = nn.Conv1d(2 * config.channels, channels[0], 7, padding=3, bias=False)
        self.stem_norm = _group_norm(channels[0])
        self.layers = nn.ModuleList(
            ResidualBlock1d(c_in, c_out)
            for c_in, c_out in itertools.pairwise([channels[0], *channels])
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels[-1], config.width)

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(torch.cat([values, missing.to(values.dtype)], dim=1))
        hidden = nn.functional.relu(self.stem_norm(hidden))
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(self.dropout(hidden.mean(-1)))


class PatchTransformer(nn.Module):
    """PatchTST-style: channel-independent patch tokens, one transformer, masked mean."""

    def __init__(self, config: TimeSeriesTowerConfig) -> None:
        super().__init__()
        self.patch = config.patch
        patches = config.window // config.patch
        self.embed = nn.Linear(2 * config.patch, config.width)
        self.position = nn.Parameter(torch.randn(1, 1, patches, config.width) * 0.02)
        self.channel = nn.Parameter(torch.randn(1, config.channels, 1, config.width) * 0.02)
        block = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            4 * config.width,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        batch, channels, length = values.shape
        pieces = torch.cat([values, missing.to(values.dtype)], dim=-1)  # [B, C, 2T]
        pieces = pieces.reshape(batch, channels, 2, length // self.patch, self.patch)
        patches = pieces.permute(0, 1, 3, 2, 4).flatten(3)  # [B, C, P, 2 * patch]
        tokens = self.embed(patches) + self.position + self.channel
        valid = (~missing).any(-1, keepdim=True).expand(-1, -1, tokens.shape[2])  # [B, C, P]
        tokens, valid = tokens.flatten(1, 2), valid.flatten(1)
        hidden = self.norm(self.layers(tokens, src_key_padding_mask=~valid))
        weights = valid.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class HFPatchTST(nn.Module):
    """transformers' ``PatchTSTModel`` on the tower's standardized signal, pooled over each
    channel's patches, then over the observed channels (module docstring)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        observed = ~missing
        hidden = self.model(
            past_values=values.transpose(1, 2),
            past_observed_mask=observed.transpose(1, 2).to(values.dtype),
        ).last_hidden_state  # [B, C, patches, width]
        weights = observed.any(-1, keepdim=True).to(hidden.dtype)  # [B, C, 1]
        return (hidden.mean(2) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class GatherPatchify(nn.Module):
    """PatchTST's patching (``PatchTSTPatchify``: ``[B, T, C]`` to ``[B, C, patches,
    patch_length]``) as one gather of constant indices instead of ``Tensor.unfold``, whose
    ONNX form gets the shapes wrong; the same numbers."""

    indices: torch.Tensor

    def __init__(self, patchify: Any) -> None:
        super().__init__()
        start, stride = int(patchify.sequence_start), int(patchify.patch_stride)
        starts = start + stride * torch.arange(int(patchify.num_patches))
        self.register_buffer("indices", starts[:, None] + torch.arange(patchify.patch_length))

    def forward(self, past_values: torch.Tensor) -> torch.Tensor:
        return past_values[:, self.indices].permute(0, 3, 1, 2)


def patchtst_config(config: TimeSeriesTowerConfig) -> Any:
    """A from-scratch ``PatchTSTConfig`` of the tower's fields: non-overlapping patches,
    layer norm (per-sample, so gradient checkpointing can recompute a block), no input
    scaling (the tower normalizes), no input masking."""
    from transformers import PatchTSTConfig

    return PatchTSTConfig(
        num_input_channels=config.channels,
        context_length=config.window,
        patch_length=config.patch,
        patch_stride=config.patch,
        d_model=config.width,
        num_attention_heads=config.heads,
        num_hidden_layers=config.layers,
        ffn_dim=4 * config.width,
        attention_dropout=config.dropout,
        ff_dropout=config.dropout,
        norm_type="layernorm",
        scaling=None,
        do_mask_input=False,
    )


def _numeric(raw: Any, where: str) -> np.ndarray:
    array = np.asarray(raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else raw)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: values must be numbers, got dtype {array.dtype}")
    return array.astype(np.float32)


@register_tower("timeseries")
class TimeSeriesTower(Tower):
    """Multichannel signals ``[channels, T]`` to ``[B, width]`` (see the module docstring).

    Example:
        >>> import numpy as np
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "timeseries", "columns": ["a", "b"], "window": 4})
        >>> item = tower.preprocess({"a": np.arange(6.0)})  # column b is missing
        >>> item[0].tolist(), bool(item[1].isnan().all())
        ([1.0, 2.0, 3.0, 4.0], True)
    """

    config_class = TimeSeriesTowerConfig
    config: TimeSeriesTowerConfig
    mean: torch.Tensor
    std: torch.Tensor
    onnx_input = "signal"

    def __init__(
        self, config: TimeSeriesTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        self.width = config.width
        self.register_buffer("mean", torch.zeros(config.channels))
        self.register_buffer("std", torch.ones(config.channels))
        self.encoder: nn.Module
        if config.encoder == "resnet":
            self.encoder = ResNet1d(config)
        elif config.encoder == "patch":
            self.encoder = PatchTransformer(config)
        else:
            model = self._patchtst()
            self.encoder = HFPatchTST(model)
            self.width = int(model.config.d_model)

    def _patchtst(self) -> PreTrainedModel:
        """``encoder: hf``: the ``path`` folder's PatchTST (checked against ``channels`` and
        ``window``; its input masking off), or one built from the config's fields."""
        from transformers import AutoModel

        if self.config.path is None:
            return AutoModel.from_config(patchtst_config(self.config), dtype=torch.float32)
        directory = hf_folder(self)
        model_config = hf_config(self, directory, "patchtst")
        channels = model_config.num_input_channels
        checked_size(self, "channels", self.config.channels, channels, "num_input_channels")
        checked_size(
            self, "window", self.config.window, model_config.context_length, "context_length"
        )
        model_config.do_mask_input = False  # the encoder, not the masked pretraining
        return hf_model(self, directory, "patchtst", model_config)

    def fit_normalization(self, signals: Any) -> None:
        """Set ``mean`` / ``std`` per channel from preprocessed signals ``[N, channels, T]``,
        ignoring NaN (missing channels and padding); a channel never observed keeps mean 0,
        one with zero spread gets std 1."""
        array = _numeric(signals, f"{self.field}: fit_normalization data").astype(np.float64)
        if array.ndim != 3 or array.shape[1] != self.config.channels:
            raise ValueError(
                f"{self.field}: fit_normalization needs [N, {self.config.channels}, T] "
                f"signals, got shape {array.shape}"
            )
        per_channel = array.transpose(1, 0, 2).reshape(self.config.channels, -1)
        observed = ~np.isnan(per_channel)
        count = np.maximum(observed.sum(1), 1)
        mean = np.where(observed, per_channel, 0.0).sum(1) / count
        spread = np.where(observed, per_channel - mean[:, None], 0.0)
        std = np.sqrt((spread**2).sum(1) / count)
        std[~(std > 1e-8)] = 1.0
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(std))

    def _channels(self, raw: Any) -> np.ndarray:
        """The raw sample as ``[channels, T]`` float32 (missing channels all NaN)."""
        where = f"{self.field}: time series sample"
        rate = None
        if isinstance(raw, tuple) and len(raw) == 2:
            raw, rate = raw
        if isinstance(raw, Mapping):
            raw = self._columns(raw, where) if self.config.columns else self._array(raw, where)
        signal = _numeric(raw, where)
        signal = signal[None] if signal.ndim == 1 else signal
        if signal.ndim != 2 or signal.shape[1] < 1:
            raise ValueError(
                f"{where} must be [{self.config.channels}, T] (channels), got shape "
                f"{list(signal.shape)}"
            )
        if signal.shape[0] != self.config.channels:
            raise SampleError(
                "bad_channels",
                f"{where} has {signal.shape[0]} channels, the tower {self.config.channels} "
                "(channels)",
            )
        if rate is not None and self.config.sample_rate is not None:
            signal = np.ascontiguousarray(resample(signal.T, int(rate), self.config.sample_rate).T)
        return signal

    def _array(self, arrays: Mapping[str, Any], where: str) -> Any:
        """An npz's array: ``npz_key``, or its only one."""
        key = self.config.npz_key
        if key is None and len(arrays) != 1:
            raise ValueError(
                f"{where} holds arrays {sorted(arrays)}; set npz_key: NAME (npz) or "
                "columns: [...] (csv) to pick the signal"
            )
        if key is not None and key not in arrays:
            raise ValueError(f"{where} has no array {key!r} (npz_key); it holds {sorted(arrays)}")
        return arrays[key] if key is not None else next(iter(arrays.values()))

    def _columns(self, table: Mapping[str, Any], where: str) -> np.ndarray:
        columns = self.config.columns or []
        present = [np.asarray(table[name]) for name in columns if name in table]
        if not present:
            raise ValueError(f"{where} has none of the columns {columns}")
        length = len(present[0])
        return np.stack(
            [
                _numeric(table[name], where)
                if name in table
                else np.full(length, np.nan, np.float32)
                for name in columns
            ]
        )

    def preprocess(self, raw: Any, augment: bool = False) -> torch.Tensor:
        """To ``[channels, window]`` float32: resample, check, crop (``augment``: a random
        window, else the centre one) or pad with NaN."""
        signal = self._channels(raw)
        where = f"{self.field}: time series sample"
        if np.isinf(signal).any():
            raise SampleError("nonfinite", f"{where} has infinite values")
        missing = np.isnan(signal)
        partial = missing.any(1) & ~missing.all(1)
        if partial.any():
            raise SampleError(
                "nonfinite",
                f"{where} has NaN samples in channels {np.flatnonzero(partial).tolist()} "
                "(a missing channel is all NaN)",
            )
        if missing.all():
            raise ValueError(f"{where} has no observed channel (every value is NaN)")
        excess = signal.shape[1] - self.config.window
        if excess > 0:
            start = int(torch.randint(excess + 1, ())) if augment else excess // 2
            signal = signal[:, start : start + self.config.window]
        elif excess < 0:
            signal = np.pad(signal, ((0, 0), (0, -excess)), constant_values=np.nan)
        return torch.from_numpy(np.ascontiguousarray(signal))

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))

    def example_raw(self) -> Any:
        """A random signal of ``window`` samples."""
        rng = np.random.default_rng(0)
        return rng.standard_normal((self.config.channels, self.config.window)).astype(np.float32)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(inputs)
        standardized = (inputs - self.mean[:, None]) / self.std[:, None]
        return self.encoder(standardized.masked_fill(missing, 0.0), missing)

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """``hf``: PatchTST's patching as :class:`GatherPatchify` (no ``unfold``)."""
        if not isinstance(self.encoder, HFPatchTST):
            yield
            return
        model = self.encoder.model
        patchify = model.patchifier
        model.patchifier = GatherPatchify(patchify)
        try:
            yield
        finally:
            model.patchifier = patchify

    def hf_parts(self) -> HFParts | None:
        """``encoder: hf``: the ``PatchTSTModel``, no processor (the model takes
        ``(signal - mean) / std`` with missing values 0), pooled per channel, and the
        ``mean`` / ``std`` buffers."""
        if not isinstance(self.encoder, HFPatchTST):
            return None
        inputs = {"mean": self.mean, "std": self.std}
        return HFParts(self.encoder.model, None, "channels", inputs)

    def save_files(self, directory: Path) -> dict[str, Any]:
        """``hf``: the PatchTST config (its weights live in the model's safetensors), so the
        tower rebuilds without the original folder."""
        if not isinstance(self.encoder, HFPatchTST):
            return {}
        self.encoder.model.config.save_pretrained(directory)
        return {"path": "."}
