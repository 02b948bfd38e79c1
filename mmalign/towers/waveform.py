"""Raw audio samples to validated mono waveforms, and resampling between integer rates.

Example:
    >>> import numpy as np
    >>> waveform, rate = load_waveform((np.ones((2, 5)), 8000))
    >>> waveform.shape, rate, resample(waveform, 8000, 16000).shape
    ((5,), 8000, (10,))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from mmalign.errors import SampleError

_MAX_CHANNELS = 16
MAX_RESAMPLING_FACTOR = 2**18
"""Largest up or down factor of the reduced rate ratio :func:`resample` accepts: the
polyphase filter has ``20 x`` that many taps (2**18: 42 MB), so a header claiming
1,000,003 Hz or 2147483647 Hz fails at once instead of asking for gigabytes."""


def _validate(waveform: np.ndarray, sample_rate: Any, source: str) -> tuple[np.ndarray, int]:
    if isinstance(sample_rate, float | np.floating) and float(sample_rate).is_integer():
        sample_rate = int(sample_rate)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise ValueError(
            f"audio {source}: sample rate must be an integer in Hz, got {sample_rate!r}"
        )
    if sample_rate <= 0:
        raise ValueError(f"audio {source}: sample rate must be positive, got {sample_rate}")
    if waveform.ndim == 2:
        if waveform.shape[0] > _MAX_CHANNELS:
            raise SampleError(
                "bad_channels",
                f"audio {source}: waveform of shape {waveform.shape} has more than "
                f"{_MAX_CHANNELS} channels; expected [channels, samples] (transpose a "
                "soundfile [samples, channels] array)",
            )
        waveform = waveform.mean(axis=0)
    if waveform.ndim != 1:
        raise ValueError(
            f"audio {source}: waveform must be [samples] or [channels, samples], "
            f"got shape {waveform.shape}"
        )
    if waveform.size == 0:
        raise ValueError(f"audio {source}: waveform is empty (0 samples)")
    finite = np.isfinite(waveform)
    if not finite.all():
        first = int(np.argmin(finite))
        raise SampleError(
            "nonfinite",
            f"audio {source}: waveform contains NaN or Inf ({int((~finite).sum())} samples, "
            f"first at index {first}); clean or drop this clip",
        )
    return waveform, int(sample_rate)


def load_waveform(raw: Any) -> tuple[np.ndarray, int]:
    """A raw audio sample to a mono float32 waveform and its sample rate, validated.

    ``raw`` is ``(waveform [T] or [channels, T], sample_rate)`` (numpy or torch) or a path to
    a file soundfile reads (wav, flac, ogg).

    Example:
        >>> import numpy as np
        >>> waveform, rate = load_waveform((np.ones((2, 5)), 8000))
        >>> waveform.shape, rate
        ((5,), 8000)
    """
    if isinstance(raw, str | Path):
        try:
            data, sample_rate = soundfile.read(str(raw), dtype="float32", always_2d=True)
        except Exception as error:  # soundfile raises several types for unreadable files
            raise ValueError(f"cannot read audio file {raw}: {error}") from error
        return _validate(data.T, int(sample_rate), f"file {raw}")
    if not (isinstance(raw, tuple | list) and len(raw) == 2):
        raise TypeError(
            "audio sample must be a (waveform, sample_rate) tuple or a wav/flac path, "
            f"got {type(raw).__name__}"
        )
    waveform, sample_rate = raw
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    try:
        array = np.asarray(waveform, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"audio waveform must be numeric samples: {error}") from error
    return _validate(array, sample_rate, "sample")


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) from one integer rate to another.

    Example:
        >>> import numpy as np
        >>> resample(np.zeros(441, dtype=np.float32), 44100, 16000).shape
        (160,)
    """
    if source_rate == target_rate:
        return waveform
    from scipy.signal import resample_poly  # imported on first use: 1-2 s at start-up

    divisor = math.gcd(source_rate, target_rate)
    up, down = target_rate // divisor, source_rate // divisor
    if max(up, down) > MAX_RESAMPLING_FACTOR:
        raise ValueError(
            f"resampling {source_rate} Hz to {target_rate} Hz needs a polyphase filter of "
            f"factors {up}/{down}, over {MAX_RESAMPLING_FACTOR}; is the clip's sample rate "
            "header wrong?"
        )
    resampled = resample_poly(waveform, up, down)
    return resampled.astype(np.float32)
