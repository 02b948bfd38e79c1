"""Raw records out of tar shards, and decoded records for code that needs raw values.

Shards are opened by :func:`mmalign.data.remote.open_shard` (local files, ``pipe:`` and the
other schemes through webdataset's ``gopen``, ``http(s)://`` with a read timeout; URL shards
are retried when reading fails) and read member by member with ``tarfile`` in stream mode.
Files are grouped into records by key here rather than by ``tarfile_to_samples`` so that a
shard that ends in the middle of a record turns that record into an error marker (reason
``truncated_tar``) instead of a silently incomplete record, and so that a member's size is
checked from its tar header before it is read: a member over ``max_member_bytes`` (a GNU-sparse
member counts its expanded size) is not read, and its record is marked ``member_too_large``.

A raw record is ``{"__key__": str, "__url__": str, "<ext>": bytes, ...}``; an error marker
carries ``"__error__": (reason, message)`` (its files, if any, are not used).

Example:
    >>> for record in iterate_records("data/digits/val-000000.tar", {"image": "png"}):
    ...     record["__key__"], record["image"].size  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import tarfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext
from webdataset.utils import make_seed

from mmalign.data.decode import RecordError, decode_fields, parse_fields
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.remote import READ_ERRORS, is_permanent, open_shard, record_fault
from mmalign.data.shards import expand_shards, is_url
from mmalign.data.sources import ShardSource, interleave, mix_resampled
from mmalign.data.splitting import Split, plan_split
from mmalign.data.survey import ShardSurvey
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


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does


def _members(stream: Any, limits: RecordLimits) -> Iterator[tuple[str, bytes | RecordError]]:
    """(name, contents) of the regular files of a tar stream; a :class:`RecordError` instead
    of the contents when the header's size is over ``limits.max_member_bytes`` (not read)."""
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for info in archive:
            if not info.isreg() or _META.match(info.name):
                continue
            if info.size > limits.max_member_bytes:
                sparse = " (GNU sparse: its expanded size)" if info.issparse() else ""
                yield (
                    info.name,
                    RecordError(
                        "member_too_large",
                        f"{info.name} is {info.size / 2**20:.1f} MiB{sparse}, over "
                        f"data.max_member_bytes ({limits.max_member_bytes / 2**20:.1f} MiB)",
                    ),
                )
            else:
                member = archive.extractfile(info)
                assert member is not None, "a regular file has contents"
                yield info.name, member.read()
            # stream mode: keep no member list (typeshed does not declare TarFile.members)
            archive.members = []  # type: ignore[attr-defined]


def _attempt(
    url: str, limits: RecordLimits, skip: int
) -> Generator[dict[str, Any], None, tuple[int, BaseException | None, str | None]]:
    """One reading of a shard, passing over its first ``skip`` records (given by an earlier
    attempt); returns the records it got through, the error that ended it (or None) and the
    key of the record being read then (or ``<after 'k'>``, or None before any record)."""
    count = 0
    current: dict[str, Any] | None = None
    last_key = None
    stream = None
    try:
        stream = open_shard(url, limits.network)
        for name, data in _members(stream, limits):
            key, extension = base_plus_ext(name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                last_key, count = current["__key__"], count + 1
                if count > skip:
                    yield current
                current = None
            current = current or {"__key__": key, "__url__": url}
            if isinstance(data, RecordError):
                current.setdefault("__error__", (data.reason, data.detail))
            else:
                current[extension.lower()] = data
    except READ_ERRORS as error:
        where = current["__key__"] if current else f"<after {last_key!r}>" if last_key else None
        return count, error, where
    finally:
        if stream is not None:
            _close_quietly(stream)
    if current is not None:
        count += 1
        if count > skip:
            yield current
    return count, None, None


def read_shard(url: str, limits: RecordLimits = DEFAULT_LIMITS) -> Iterator[dict[str, Any]]:
    """Raw records of one shard; a read error ends the shard with one error marker
    (``truncated_tar`` after some records, ``unreadable_shard`` before any, or
    ``unreachable_shard`` for a URL shard), after the retries of
    :mod:`mmalign.data.remote` for a URL."""
    policy, given, retry = limits.network, 0, 0
    while True:
        count, error, where = yield from _attempt(url, limits, given)
        given = max(given, count)
        if error is None:
            return
        remote = is_url(url)
        if remote and retry < policy.retries and not is_permanent(error):
            record_fault(url, "retried", error)
            time.sleep(policy.delay(retry))
            retry += 1
            continue
        if remote:
            record_fault(url, "gave_up", error)
        started = where is not None or given > 0
        unread = "unreachable_shard" if remote else "unreadable_shard"
        reason = "truncated_tar" if started else unread
        key = where or (f"<after record {given}>" if started else "<shard>")
        yield {"__key__": key, "__url__": url, "__error__": (reason, str(error))}
        return


def read_shards(
    sources: Iterable[Mapping[str, str]], limits: RecordLimits = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """Raw records of a stream of ``{"url": ...}`` shard entries, one shard after another."""
    for source in sources:
        yield from read_shard(source["url"], limits)


def _source_records(
    urls: list[str],
    split: Split,
    reader: Any,
    *,
    resampled: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> wds.DataPipeline:
    """The raw records of one source's shards for one split (not shuffled by record)."""
    stride, offset = 1, 0
    if resampled:
        shard_source = wds.ResampledShards(
            urls,
            seed=make_seed(seed, epoch),
            worker_seed=lambda: split.index,
            deterministic=True,
        )
    else:
        plan = plan_split(urls, split, shuffle=shuffle, seed=seed, epoch=epoch)
        shard_source = wds.SimpleShardList(plan.urls)
        stride, offset = plan.stride, plan.offset
    return wds.DataPipeline(
        shard_source,
        reader,
        (lambda records: islice(records, offset, None, stride)) if stride > 1 else None,
    )


def counting_reader(
    read_one: Callable[[str], Iterator[dict[str, Any]]], observed: list[int]
) -> Callable[[Iterable[Mapping[str, str]]], Iterator[dict[str, Any]]]:
    """A reader of ``{"url": ...}`` shard entries (as :func:`read_shards`) that appends to
    ``observed`` the number of records of each shard it starts, as they are read."""

    def read(entries: Iterable[Mapping[str, str]]) -> Iterator[dict[str, Any]]:
        for entry in entries:
            observed.append(0)
            for raw in read_one(entry["url"]):
                observed[-1] += 1
                yield raw

    return read


def raw_records(
    sources: Sequence[str] | Sequence[ShardSource],
    split: Split,
    *,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    limits: RecordLimits = DEFAULT_LIMITS,
    survey: ShardSurvey | None = None,
    observed: Sequence[list[int]] | None = None,
) -> Iterator[dict[str, Any]]:
    """The raw records (and error markers) one split reads in one epoch, shuffled if asked.

    ``sources`` are shard URLs (one source) or :class:`~mmalign.data.sources.ShardSource`
    objects, mixed by weight (:mod:`mmalign.data.sources`). Resampled streams draw shards
    with replacement, seeded per split and epoch, forever, or until ``survey`` has a verdict
    (the caller settles each record with it). ``observed`` (one list per source) gets the
    records read of each shard, in this split's order (:mod:`mmalign.data.resume`).
    """
    groups: list[ShardSource] = [
        item if isinstance(item, ShardSource) else ShardSource("source0", 1.0, [item], False)
        for item in sources
    ]
    if not isinstance(sources[0], ShardSource):
        groups = [ShardSource("source0", 1.0, [url for g in groups for url in g.urls], False)]
    reader = functools.partial(read_shards, limits=limits)
    if survey is not None:
        reader = functools.partial(
            survey.read, read_shard=functools.partial(read_shard, limits=limits)
        )
    readers: list[Any] = [reader] * len(groups)
    if observed is not None and survey is None:
        one = functools.partial(read_shard, limits=limits)
        readers = [counting_reader(one, counts) for counts in observed]
    streams = [
        iter(
            _source_records(
                group.urls,
                split,
                readers[index],
                resampled=resampled,
                shuffle=shuffle_buffer > 0,
                seed=seed,
                epoch=epoch,
            )
        )
        for index, group in enumerate(groups)
    ]
    records: Iterator[dict[str, Any]] = streams[0]
    if len(streams) > 1:
        weights = [group.weight for group in groups]
        records = (
            mix_resampled(streams, weights, make_seed(seed, epoch, split.index, len(streams)))
            if resampled
            else interleave(streams, weights)
        )
    if shuffle_buffer > 1:
        shuffle = wds.shuffle(
            shuffle_buffer, initial=shuffle_buffer, seed=make_seed(seed, epoch, split.index)
        )
        records = shuffle(records)
    return records


def iterate_records(
    shards: str | Sequence[str],
    fields: Mapping[str, str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    field: str = "shards",
    limits: RecordLimits = DEFAULT_LIMITS,
    kinds: Mapping[str, str | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded records with their keys, without towers (for export and zero-shot code).

    ``fields`` maps names to extensions (``{"image": "png", "meta": "json"}``); ``kinds``
    names the type of tower that reads a field, which picks the decoder of some files as
    the loader's does (``{"sound": "audio"}``: an ``mp4`` is read as its audio track, not
    as a video; ``{"ecg": "timeseries"}``: an ``npz`` as arrays, not a graph). Each record is
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
    for raw in raw_records(urls, Split(rank, world_size), limits=limits):
        key, url = raw["__key__"], raw["__url__"]
        try:
            if "__error__" in raw:
                raise RecordError(*raw["__error__"])
            values = decode_fields(raw, parsed, limits, kinds)
        except RecordError as error:
            log_skip(url, key, error.reason, str(error))
            continue
        if values:
            yield {"__key__": key, "__url__": url, **values}


def unsafe_key(key: str) -> str | None:
    """Why a record key cannot name tar members of a new shard (it would write outside the
    folder a user extracts it into): absolute, a ``..`` part, a backslash or NUL, empty;
    ``None`` for a key that can (``a/b/sample-1`` can: webdataset keys hold folders).

    Example:
        >>> unsafe_key("train/sample-000001"), unsafe_key("../../etc/x")
        (None, "key '../../etc/x' climbs out of the shard (a '..' part)")
    """
    if not key or "\0" in key or "\\" in key:
        return f"key {key!r} is empty or holds a NUL or a backslash"
    if key.startswith("/"):
        return f"key {key!r} is an absolute path"
    if ".." in key.split("/"):
        return f"key {key!r} climbs out of the shard (a '..' part)"
    return None
