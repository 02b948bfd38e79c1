"""Log-mel spectrograms in torch: a mel filterbank and a batched STFT front end.

The audio tower computes its features inside ``forward`` with :class:`LogMel`, so they run on
the model's device. The filterbank follows the usual triangular construction (filters evenly
spaced on the HTK or Slaney mel scale, optionally area-normalized as in Slaney's Auditory
Toolbox); the spectrogram is ``torch.stft`` with a periodic Hann window, centred frames and
reflect padding, as librosa and Whisper compute it.

Example:
    >>> import torch
    >>> front_end = LogMel(sample_rate=16000, n_fft=400, hop_length=160, n_mels=64)
    >>> front_end(torch.zeros(2, 16000)).shape
    torch.Size([2, 64, 101])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MelScale = Literal["htk", "slaney"]

_SLANEY_LINEAR_HZ = 200.0 / 3.0  # Hz per mel below 1 kHz on the Slaney scale
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # log-Hz per mel above 1 kHz


def hz_to_mel(frequency: torch.Tensor, mel_scale: MelScale = "htk") -> torch.Tensor:
    """Frequencies in Hz to mels on the HTK (``2595 log10(1 + f / 700)``) or Slaney scale."""
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + frequency / 700.0)
    linear = frequency / _SLANEY_LINEAR_HZ
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_HZ
    logarithmic = (
        break_mel
        + torch.log(frequency.clamp(min=_SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    )
    return torch.where(frequency >= _SLANEY_BREAK_HZ, logarithmic, linear)


def mel_to_hz(mel: torch.Tensor, mel_scale: MelScale = "htk") -> torch.Tensor:
    """Mels back to Hz; the inverse of :func:`hz_to_mel`."""
    if mel_scale == "htk":
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_HZ
    linear = mel * _SLANEY_LINEAR_HZ
    logarithmic = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - break_mel))
    return torch.where(mel >= break_mel, logarithmic, linear)


def mel_filterbank(
    n_freqs: int,
    n_mels: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    mel_scale: MelScale = "htk",
    slaney_norm: bool = False,
) -> torch.Tensor:
    """Triangular mel filters as a ``[n_freqs, n_mels]`` matrix (float64).

    ``n_freqs`` is ``n_fft // 2 + 1``. Filter ``i`` rises linearly (in Hz) from mel point ``i``
    to ``i + 1`` and falls to ``i + 2``, with ``n_mels + 2`` points evenly spaced in mels over
    ``[f_min, f_max]``. ``slaney_norm`` divides each filter by half its bandwidth in Hz, so
    every filter has the same area.

    Example:
        >>> mel_filterbank(201, 40, 16000).shape
        torch.Size([201, 40])
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bin_hz = torch.linspace(0.0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mel_points = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64), mel_scale)),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64), mel_scale)),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges_hz = mel_to_hz(mel_points, mel_scale)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lower) / (centre - lower)
    falling = (upper - bin_hz[:, None]) / (upper - centre)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if slaney_norm:
        filters = filters * (2.0 / (upper - lower))
    return filters


class LogMel(nn.Module):
    """Batched log-mel spectrogram: ``[B, T]`` waveforms to ``[B, n_mels, frames]``.

    Power spectrogram of a centred, reflect-padded STFT (periodic Hann window of
    ``win_length`` samples inside ``n_fft``), projected on :func:`mel_filterbank` (arguments
    as there), then
    ``log(max(mel, log_floor))``. There are ``T // hop_length + 1`` frames; frame ``i`` is
    centred on sample ``i * hop_length``. Always computed in float32 (autocast is disabled).

    Example:
        >>> import torch
        >>> LogMel(16000, n_fft=512, hop_length=256, n_mels=40).frame_lengths(
        ...     torch.tensor([1, 256, 257]))
        tensor([1, 1, 2])
    """

    window: torch.Tensor
    filters: torch.Tensor

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        win_length: int | None = None,
        f_min: float = 0.0,
        f_max: float | None = None,
        mel_scale: MelScale = "htk",
        slaney_norm: bool = False,
        log_floor: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length or n_fft
        self.log_floor = log_floor
        filters = mel_filterbank(
            n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max, mel_scale, slaney_norm
        )
        # Derived from the config, so not saved with the weights.
        self.register_buffer("filters", filters.float(), persistent=False)
        self.register_buffer(
            "window", torch.hann_window(self.win_length, periodic=True), persistent=False
        )

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames whose centre falls on a real sample, for clips of ``lengths`` samples."""
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            spectrum = torch.stft(
                waveform.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
            power = spectrum.real.square() + spectrum.imag.square()
            mel = torch.einsum("fm,bft->bmt", self.filters, power)
            return torch.log(mel.clamp(min=self.log_floor))


class ConvLogMel(nn.Module):
    """:class:`LogMel` with its STFT as a strided 1-d convolution over
    the reflect-padded waveform with the windowed cosine and sine DFT rows (real ONNX ops, for
    export: torch's TorchScript-based ONNX exporter has no complex STFT).

    Example:
        >>> log_mel = LogMel(16000, n_fft=400, hop_length=160, n_mels=64)
        >>> waveform = torch.randn(2, 4000)
        >>> torch.allclose(ConvLogMel(log_mel)(waveform), log_mel(waveform), atol=1e-3)
        True
    """

    basis: torch.Tensor
    filters: torch.Tensor

    def __init__(self, log_mel: LogMel) -> None:
        super().__init__()
        n_fft, width = log_mel.n_fft, log_mel.win_length
        window = torch.zeros(n_fft, dtype=torch.float64)
        start = (n_fft - width) // 2  # torch.stft centres a shorter window inside n_fft
        window[start : start + width] = log_mel.window.double()
        angle = (
            2
            * math.pi
            / n_fft
            * torch.outer(torch.arange(n_fft // 2 + 1, dtype=torch.float64), torch.arange(n_fft))
        )
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)
        self.register_buffer("filters", log_mel.filters, persistent=False)
        self.n_fft, self.hop_length, self.log_floor = n_fft, log_mel.hop_length, log_mel.log_floor
        self.frame_lengths = log_mel.frame_lengths

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        half = self.n_fft // 2
        padded = F.pad(waveform.float()[:, None, :], (half, half), mode="reflect")
        real, imag = F.conv1d(padded, self.basis, stride=self.hop_length).chunk(2, dim=1)
        mel = torch.einsum("fm,bft->bmt", self.filters, real.square() + imag.square())
        return torch.log(mel.clamp(min=self.log_floor))
