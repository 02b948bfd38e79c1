"""Resume a reader's finite epoch without opening the shards it consumed.

A reader's raw records go: shards in plan order -> (sources interleaved by weight) -> the
shuffle buffer -> out. At a resume mark the reader had sent ``drawn`` records out and had
read ``counts[source][shard]`` records of each shard it had started. Which of them had come
out and which were still in the shuffle buffer depends only on those counts and the seeds
(webdataset's shuffle picks buffer slots with its own seeded RNG, never by content), so it
is found by running the same interleave and shuffle over *placeholders* (source, shard,
record). The resumed stream then gives the same sequence of inputs as the first run, with
real records only where they are still needed (the *backlog*: records in the buffer at the
mark) and placeholders elsewhere: a consumed shard without a backlog record is not opened,
one with some is read for them, the shard being read at the mark and the shards after it
are read as usual. The first ``drawn`` outputs are placeholders or backlog records already
sent, and are dropped; after them every output is a real record, in the order of an
uninterrupted run.

Example:
    >>> sorted(shuffle_backlog([[3, 2]], [1.0], drawn=5, buffer=0, seed=0))
    []
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import webdataset as wds
from webdataset.utils import make_seed

from mmalign.data.sources import ShardSource, interleave

PLACEHOLDER = "__placeholder__"
"""The raw-record key that marks a record passed over without reading it."""

Position = tuple[int, int, int]
"""(source, shard in the reader's plan, record in the shard)."""


class OutOfStep(RuntimeError):
    """The shards no longer hold what the resume mark counted (changed data or settings)."""


def _shuffled(items: Iterator[Any], buffer: int, seed: int) -> Iterator[Any]:
    if buffer <= 1:
        return items
    return iter(wds.shuffle(buffer, initial=buffer, seed=seed)(items))


def _mixed(streams: list[Iterator[Any]], weights: Sequence[float]) -> Iterator[Any]:
    return streams[0] if len(streams) == 1 else interleave(streams, weights)


def shuffle_backlog(
    counts: Sequence[Sequence[int]],
    weights: Sequence[float],
    drawn: int,
    buffer: int,
    seed: int,
) -> set[Position]:
    """The records read but not yet sent out after ``drawn`` outputs (module docstring)."""
    streams = [
        iter([(source, shard, record) for shard, n in enumerate(c) for record in range(n)])
        for source, c in enumerate(counts)
    ]
    read: list[Position] = []

    def inputs() -> Iterator[Position]:
        # ends where the mark's reading stood: had the shards given more before the
        # ``drawn``-th output, the shuffle would have read them and the counts say so
        for position in _mixed(streams, weights):
            read.append(position)
            yield position

    sent = set(islice(_shuffled(inputs(), buffer, seed), drawn))
    if len(sent) != drawn or len(read) != sum(map(sum, counts)):
        raise OutOfStep(f"the mark's counts {counts} do not give {drawn} records")
    return set(read) - sent


def _placeholder(url: str) -> dict[str, Any]:
    return {"__key__": PLACEHOLDER, "__url__": url, PLACEHOLDER: True}


def _shard_inputs(
    url: str, count: int, needed: set[int], read_shard: Callable[[str], Iterator[dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    """A consumed shard's ``count`` inputs: placeholders, read only for ``needed`` records."""
    if not needed:
        yield from (_placeholder(url) for _ in range(count))
        return
    given = 0
    for given, raw in enumerate(read_shard(url), start=1):
        yield raw if given - 1 in needed else _placeholder(url)
    if given != count:
        raise OutOfStep(f"{url} now has {given} records; the resume mark counted {count}")


def _resumed_source(
    urls: Sequence[str],
    counts: Sequence[int],
    needed: dict[int, set[int]],
    read_shard: Callable[[str], Iterator[dict[str, Any]]],
    observed: list[int],
) -> Iterator[dict[str, Any]]:
    """One source's inputs: consumed shards by :func:`_shard_inputs`, the shard being read
    at the mark and the later ones as usual; ``observed`` gets each shard's count."""
    for shard, url in enumerate(urls):
        if shard < len(counts) - 1:
            inputs = _shard_inputs(url, counts[shard], needed.get(shard, set()), read_shard)
        else:
            inputs = read_shard(url)
        observed.append(0)
        for raw in inputs:
            observed[-1] += 1
            yield raw


def resumed_records(
    sources: Sequence[ShardSource],
    plans: Sequence[Sequence[str]],
    counts: Sequence[Sequence[int]],
    drawn: int,
    *,
    buffer: int,
    seed: int,
    epoch: int,
    index: int,
    read_shard: Callable[[str], Iterator[dict[str, Any]]],
    observed: Sequence[list[int]],
) -> Iterator[dict[str, Any]]:
    """The records of reader ``index`` after its first ``drawn`` (module docstring);
    ``plans`` are each source's shards in this reader's order, ``counts`` the mark's;
    ``observed`` gets each source's records per shard, as :func:`raw_records` counts them."""
    seed = make_seed(seed, epoch, index)
    weights = [source.weight for source in sources]
    needed: list[dict[int, set[int]]] = [defaultdict(set) for _ in sources]
    for source, shard, record in shuffle_backlog(counts, weights, drawn, buffer, seed):
        needed[source][shard].add(record)
    streams = [
        _resumed_source(plan, c, n, read_shard, o)
        for plan, c, n, o in zip(plans, counts, needed, observed, strict=True)
    ]
    for raw in islice(_shuffled(_mixed(streams, weights), buffer, seed), drawn, None):
        if PLACEHOLDER in raw:
            raise OutOfStep("a record passed over at the resume came out after the mark")
        yield raw
