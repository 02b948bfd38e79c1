"""Per-record limits: what one record may cost, checked from headers before the work is done.

A record over a limit is skipped and counted under its reason, like any other bad record:

======================  ======================================================  ===================
limit                   checked from                                            reason
======================  ======================================================  ===================
``max_member_bytes``    the tar header's size (a GNU-sparse member's expanded   ``member_too_large``
                        size), before the file is read
``audio_sample_rates``  the audio header (``soundfile.info``), before decoding  ``bad_sample_rate``
``max_audio_seconds``   the audio header (frames / rate), before decoding       ``too_long``
``max_decoded_bytes``   audio header (frames x channels x 4), image header      ``too_large``
                        (width x height x bands), npz directory (sizes),
                        before decoding
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
            network=NetworkPolicy(data.read_timeout, data.retries, data.retry_backoff),
        )


DEFAULT_LIMITS = RecordLimits.from_config(DataConfig())
"""The limits of a default ``data`` section (what code without a run config uses)."""
