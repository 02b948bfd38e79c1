"""The audio limits checked from a header (a sound file's or a video's audio track) before
decoding: sample rate, duration and decoded size (:mod:`mmalign.data.limits`).

Example:
    >>> from types import SimpleNamespace
    >>> from mmalign.data.limits import DEFAULT_LIMITS
    >>> check_audio_header(SimpleNamespace(samplerate=16000, frames=16000, channels=1),
    ...     DEFAULT_LIMITS)
"""

from __future__ import annotations

from typing import Any

from mmalign.data.limits import RecordLimits
from mmalign.data.record_error import RecordError, check_decoded_size


def check_audio_header(info: Any, limits: RecordLimits) -> None:
    """Raise :class:`RecordError` when a ``soundfile.info`` header is over a limit: sample
    rate (``bad_sample_rate``), duration (``too_long``), float32 size (``too_large``).

    Example:
        >>> from types import SimpleNamespace
        >>> from mmalign.data.limits import DEFAULT_LIMITS
        >>> header = SimpleNamespace(samplerate=2147483647, frames=800, channels=1)
        >>> check_audio_header(header, DEFAULT_LIMITS)
        Traceback (most recent call last):
        ...
        mmalign.data.record_error.RecordError: bad_sample_rate: ...
    """
    lowest, highest = limits.audio_sample_rates
    if not lowest <= info.samplerate <= highest:
        raise RecordError(
            "bad_sample_rate",
            f"the header says {info.samplerate} Hz, outside data.audio_sample_rates "
            f"[{lowest}, {highest}]",
        )
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise RecordError(
            "too_long",
            f"the header says {seconds:.1f} s ({info.frames} frames at {info.samplerate} Hz), "
            f"over data.max_audio_seconds ({limits.max_audio_seconds:g} s)",
        )
    check_decoded_size(info.frames * info.channels * 4, "the clip", limits)
