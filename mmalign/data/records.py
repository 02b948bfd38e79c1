"""Raw records out of tar shards, and decoded records for code that needs raw values.

Shards are opened with webdataset's ``gopen`` (local files, ``pipe:``, ``http(s)://`` and the
other schemes webdataset knows) and read with its tar iterator. Files are grouped into
records by key here rather than by ``tarfile_to_samples`` so that a shard that ends in the
middle of a record turns that record into an error marker (reason ``truncated_tar``) instead
of a silently incomplete record.

A raw record is ``{"__key__": str, "__url__": str, "<ext>": bytes, ...}``; an error marker
carries ``"__error__": (reason, message)`` instead of files.

Example:
    >>> for record in iterate_records("data/digits/val-000000.tar", {"image": "png"}):
    ...     record["__key__"], record["image"].size  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_iterator
from webdataset.utils import make_seed

from mmalign.data.decode import RecordError, decode_fields, parse_fields
from mmalign.data.shards import expand_shards
from mmalign.data.splitting import Split, plan_split
from mmalign.dist import resolve_world

logger = logging.getLogger("mmalign.data")
_logged: set[tuple[str, str, str]] = set()


def log_skip(url: str, key: str, reason: str, message: str) -> None:
    """Log a skipped record once per process (shard, key and reason)."""
    if (url, key, reason) in _logged:
        return
    _logged.add((url, key, reason))
    logger.warning("skipping record %r in shard %s (%s): %s", key, url, reason, message)


def _close_quietly(stream: Any) -> None:
    with contextlib.suppress(OSError):
        stream.close()


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw records of one shard; a read error ends the shard with one error marker
    (``truncated_tar`` after some records, ``unreadable_shard`` before any)."""
    current: dict[str, Any] | None = None
    last_key = None
    stream = None
    try:
        stream = wds.gopen(url)
        for entry in tar_file_iterator(stream):
            key, extension = base_plus_ext(entry["fname"])
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                last_key = current["__key__"]
                yield current
                current = None
            current = current or {"__key__": key, "__url__": url}
            current[extension.lower()] = entry["data"]
    except (tarfile.TarError, OSError, EOFError) as error:
        started = current is not None or last_key is not None
        key = current["__key__"] if current else f"<after {last_key!r}>"
        reason = "truncated_tar" if started else "unreadable_shard"
        current = None
        yield {"__key__": key, "__url__": url, "__error__": (reason, str(error))}
    finally:
        if stream is not None:
            _close_quietly(stream)
    if current is not None:
        yield current


def read_shards(sources: Iterable[Mapping[str, str]]) -> Iterator[dict[str, Any]]:
    """Raw records of a stream of ``{"url": ...}`` shard entries, one shard after another."""
    for source in sources:
        yield from read_shard(source["url"])


def raw_records(
    urls: list[str],
    split: Split,
    *,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
) -> wds.DataPipeline:
    """The raw records (and error markers) one split reads in one epoch, shuffled if asked.

    Resampled streams draw shards with replacement, seeded per split and epoch, forever.
    """
    stride, offset = 1, 0
    if resampled:
        shard_source = wds.ResampledShards(
            urls,
            seed=make_seed(seed, epoch),
            worker_seed=lambda: split.index,
            deterministic=True,
        )
    else:
        plan = plan_split(urls, split, shuffle=shuffle_buffer > 0, seed=seed, epoch=epoch)
        shard_source = wds.SimpleShardList(plan.urls)
        stride, offset = plan.stride, plan.offset
    return wds.DataPipeline(
        shard_source,
        read_shards,
        (lambda records: islice(records, offset, None, stride)) if stride > 1 else None,
        wds.shuffle(
            shuffle_buffer,
            initial=shuffle_buffer,
            seed=make_seed(seed, epoch, split.index),
        )
        if shuffle_buffer > 1
        else None,
    )


def iterate_records(
    shards: str | Sequence[str],
    fields: Mapping[str, str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    field: str = "shards",
) -> Iterator[dict[str, Any]]:
    """Decoded records with their keys, without towers (for export and zero-shot code).

    ``fields`` maps names to extensions (``{"image": "png", "meta": "json"}``); each record is
    ``{"__key__": key, "__url__": shard, name: decoded value, ...}`` with absent files left
    out. Records that fail to decode are logged and skipped; records with none of the fields
    are skipped. Reading is in shard order; with ``world_size > 1`` each rank gets its part.

    Example:
        >>> records = iterate_records("data/digits/test-000000.tar", {"text": "txt", "y": "cls"})
        >>> next(records)["y"]  # doctest: +SKIP
        4
    """
    urls = expand_shards(shards, field)
    rank, world_size = resolve_world(rank, world_size)
    parsed = parse_fields(fields)
    for raw in raw_records(urls, Split(rank, world_size)):
        key, url = raw["__key__"], raw["__url__"]
        try:
            if "__error__" in raw:
                raise RecordError(*raw["__error__"])
            values = decode_fields(raw, parsed)
        except RecordError as error:
            log_skip(url, key, error.reason, str(error))
            continue
        if values:
            yield {"__key__": key, "__url__": url, **values}
