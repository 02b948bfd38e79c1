"""The error of a record file that cannot be decoded, and the decoded-size limit check that
every decoder shares (:mod:`mmalign.data.decode`, :mod:`mmalign.data.video`).

Example:
    >>> from mmalign.data.limits import DEFAULT_LIMITS
    >>> check_decoded_size(2**40, "the clip", DEFAULT_LIMITS)
    Traceback (most recent call last):
    ...
    mmalign.data.record_error.RecordError: too_large: the clip would decode to ...
"""

from __future__ import annotations

from mmalign.data.limits import RecordLimits


class RecordError(ValueError):
    """A record file could not be decoded; ``reason`` is the counter name (``bad_image``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


def check_decoded_size(decoded_bytes: int, what: str, limits: RecordLimits) -> None:
    """Raise ``too_large`` when ``what`` would decode to more than ``max_decoded_bytes``."""
    if decoded_bytes > limits.max_decoded_bytes:
        raise RecordError(
            "too_large",
            f"{what} would decode to {decoded_bytes / 2**20:.1f} MiB, over "
            f"data.max_decoded_bytes ({limits.max_decoded_bytes / 2**20:.1f} MiB)",
        )
