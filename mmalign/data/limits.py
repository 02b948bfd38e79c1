"""Per-record limits: what one record may cost, checked from headers before the work is done.

A record over a limit is skipped and counted under its reason, like any other bad record:

======================  ======================================================  ===================
limit                   checked from                                            reason
======================  ======================================================  ===================
``max_member_bytes``    the tar header's size (a GNU-sparse member's expanded   ``member_too_large``
                        size), before the file is read
``audio_sample_rates``  the audio header (``soundfile.info``, or a video's      ``bad_sample_rate``
                        audio track), before decoding
``max_audio_seconds``   the audio header (frames / rate), before decoding; a    ``too_long``
                        video's audio track also stops decoding there
``max_decoded_bytes``   audio header (frames x channels x 4), image header      ``too_large``
                        (width x height x bands), npz directory (sizes), npy
                        header (shape x item size), video header (frames x
                        width x height x 3), before decoding
``max_video_seconds``   the video container's header (duration)                 ``too_long``
``max_video_frames``    the video stream's frame count (or duration x rate)     ``too_long``
``max_video_pixels``    the video stream's width x height                       ``too_large``
``max_signal_samples``  an npy header's last axis (1 or 2 axes), csv rows       ``too_long``
``max_signal_channels`` an npy header's first axis (2 axes), csv columns        ``too_large``
======================  ======================================================  ===================

The limits are fields of the run config's ``data`` section (:class:`~mmalign.config.DataConfig`,
the one place of their defaults); the defaults hold any ordinary clip, photo or array and stop
headers that claim hours of audio, gigapixels or gigabytes.

Example:
    >>> DEFAULT_LIMITS.max_member_bytes // 2**20
    64
    >>> RecordLimits.from_config(DataConfig(audio_sample_rates=(8000, 48000))).audio_sample_rates
    (8000, 48000)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmalign.config import DataConfig
from mmalign.data.remote import NetworkPolicy


@dataclass(frozen=True)
class RecordLimits:
    """What one record may cost (see the module docstring and ``DataConfig``)."""

    max_member_bytes: int
    max_decoded_bytes: int
    audio_sample_rates: tuple[int, int]
    max_audio_seconds: float
    max_video_seconds: float
    max_video_frames: int
    max_video_pixels: int
    max_signal_samples: int
    max_signal_channels: int
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    """How URL shards are read (``data.read_timeout``, ``data.retries``, ...)."""

    @classmethod
    def from_config(cls, data: DataConfig) -> RecordLimits:
        """The limits a run's ``data`` section sets.

        Example:
            >>> RecordLimits.from_config(DataConfig(max_audio_seconds=30)).max_audio_seconds
            30.0
        """
        return cls(
            max_member_bytes=data.max_member_bytes,
            max_decoded_bytes=data.max_decoded_bytes,
            audio_sample_rates=data.audio_sample_rates,
            max_audio_seconds=float(data.max_audio_seconds),
            max_video_seconds=float(data.max_video_seconds),
            max_video_frames=data.max_video_frames,
            max_video_pixels=data.max_video_pixels,
            max_signal_samples=data.max_signal_samples,
            max_signal_channels=data.max_signal_channels,
            network=NetworkPolicy(data.read_timeout, data.retries, data.retry_backoff),
        )


DEFAULT_LIMITS = RecordLimits.from_config(DataConfig())
"""The limits of a default ``data`` section (what code without a run config uses)."""
