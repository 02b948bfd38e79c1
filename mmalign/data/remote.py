"""Opening shards that live behind a network: a read timeout, bounded retries with backoff,
and a record of every fault with its URL.

``http(s)://`` shards are read in this process with ``urllib`` and a socket timeout
(``data.read_timeout``: a server that stops sending raises instead of hanging; webdataset's
own ``http`` opener runs ``curl`` without one). Every other URL (``pipe:`` commands, ``gs:``,
``hf:`` ...) and local paths are opened by webdataset's ``gopen``. What happens when reading
fails (:func:`mmalign.data.records.read_shard`): a URL shard is opened again up to
``data.retries`` times, ``data.retry_backoff`` seconds after the first failure and twice as
long after each further one, and the records it already gave are passed over; a shard that
still fails is skipped (its records counted as ``unreachable_shard`` when none was read,
``truncated_tar`` otherwise). An HTTP client error (4xx other than 408/429) is not retried.
Each failure is logged with its URL and kept in :data:`FAULTS` until the loader collects it
(:func:`take_faults`) to count it under ``faults/retried`` or ``faults/gave_up``.

Example:
    >>> policy = NetworkPolicy(read_timeout=5.0, retries=2, retry_backoff=0.5)
    >>> [policy.delay(attempt) for attempt in range(2)]
    [0.5, 1.0]
"""

from __future__ import annotations

import http.client
import logging
import tarfile
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import IO, Any

import webdataset as wds

logger = logging.getLogger("mmalign.data")

READ_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException)
"""What reading a shard may raise when its bytes do not arrive whole."""


@dataclass(frozen=True)
class NetworkPolicy:
    """How URL shards are read: seconds without a byte before a read fails, retries of a
    failed shard, seconds before the first retry (doubled for each further one)."""

    read_timeout: float = 60.0
    retries: int = 3
    retry_backoff: float = 1.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0 for the first)."""
        return float(self.retry_backoff * 2**attempt)


@dataclass(frozen=True)
class Fault:
    """A failed read of ``url``: ``outcome`` ``retried`` or ``gave_up``, and the error."""

    url: str
    outcome: str
    message: str


FAULTS: deque[Fault] = deque(maxlen=10_000)
"""Faults of this process not yet collected by :func:`take_faults` (the latest 10,000: code
that reads shards without a loader does not collect them)."""


def take_faults() -> list[Fault]:
    """The faults recorded since the previous call (and forget them)."""
    taken = list(FAULTS)
    FAULTS.clear()
    return taken


def record_fault(url: str, outcome: str, error: BaseException) -> None:
    """Log a failed read of ``url`` and keep it for :func:`take_faults`."""
    message = f"{type(error).__name__}: {error}"
    FAULTS.append(Fault(url, outcome, message))
    action = "retrying" if outcome == "retried" else "skipping"
    logger.warning("reading shard %s failed (%s); %s it", url, message, action)


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot help (an HTTP client error other than timeout/too many)."""
    return (
        isinstance(error, urllib.error.HTTPError)
        and 400 <= error.code < 500
        and (error.code not in (408, 429))
    )


def open_shard(url: str, policy: NetworkPolicy) -> IO[bytes] | Any:
    """A readable binary stream of a shard (see the module docstring)."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=policy.read_timeout)
    return wds.gopen(url)
