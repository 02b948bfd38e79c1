"""Several shard sources mixed by weight (``data.train: [{shards, weight, name}, ...]``).

A *source* is a set of shards with a weight and a name. One source (the plain forms of
``data.train``: a pattern, a directory, a list) is read as before. Several are mixed record by
record:

- **resampled** streams (``data.resampled: true``) draw the source of each record at random
  with probability ``weight / sum of weights`` (seeded per reader and epoch, so a resumed run
  draws the same sources), then the next record of that source's own resampled stream;
- **finite** epochs interleave the sources by weight, smoothly and deterministically: the next
  record comes from the source with the fewest records taken so far relative to its weight;
  a source that runs out leaves the others to go on, so every record of every source is read
  once per epoch (weights set the order, not the counts: the plan gives each source's count).

Example:
    >>> sources = [ShardSource("a", 1.0, ["a.tar"]), ShardSource("b", 3.0, ["b.tar"])]
    >>> "".join(interleave([iter("aaaa"), iter("bbbbbb")], [s.weight for s in sources]))
    'bbabbbabaa'
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

from mmalign.config import DataSource
from mmalign.data.shards import expand_shards, is_url


@dataclass(frozen=True)
class ShardSource:
    """A named, weighted set of shard URLs; ``named`` is False for the plain forms of a shard
    setting (no per-source counters then)."""

    name: str
    weight: float
    urls: list[str]
    named: bool = True


def resolve_sources(
    spec: str | Sequence[str] | Sequence[DataSource], field: str = "shards"
) -> list[ShardSource]:
    """The sources of a shard setting: one unnamed source for the plain forms, else one per
    :class:`~mmalign.config.DataSource` (named ``source<i>`` when no name is given).

    Example:
        >>> resolve_sources("pipe:cat a.tar")
        [ShardSource(name='source0', weight=1.0, urls=['pipe:cat a.tar'], named=False)]
    """
    if isinstance(spec, str) or not spec or not isinstance(spec[0], DataSource | dict):
        plain: str | Sequence[str] = spec  # type: ignore[assignment]
        return [ShardSource("source0", 1.0, expand_shards(plain, field), named=False)]
    sources = [DataSource.model_validate(item) for item in spec]
    return [
        ShardSource(
            source.name or f"source{index}",
            source.weight,
            expand_shards(source.shards, f"{field}[{index}].shards"),
        )
        for index, source in enumerate(sources)
    ]


def mix_resampled(streams: Sequence[Iterator], weights: Sequence[float], seed: int) -> Iterator:
    """Endless items, each from a source drawn with probability proportional to its weight
    (``streams`` are endless); ends when the drawn stream ends."""
    rng = random.Random(seed)
    indices = range(len(streams))
    while True:
        (drawn,) = rng.choices(indices, weights=weights)
        item = next(streams[drawn], None)
        if item is None:
            return
        yield item


def interleave(streams: Sequence[Iterator], weights: Sequence[float]) -> Iterator:
    """Every item of every stream, interleaved by weight (see the module docstring)."""
    taken = [0] * len(streams)
    active = list(range(len(streams)))
    while active:
        index = min(active, key=lambda i: ((taken[i] + 1) / weights[i], i))
        item = next(streams[index], None)
        if item is None:
            active.remove(index)
            continue
        taken[index] += 1
        yield item


def count_records(urls: Sequence[str]) -> int | None:
    """The records (distinct keys, in order) of local tar shards, from their headers only;
    ``None`` when a shard is a URL or cannot be read.

    Example:
        >>> count_records(["https://example.org/a.tar"]) is None
        True
    """
    total = 0
    for url in urls:
        if is_url(url):
            return None
        try:
            with tarfile.open(url) as archive:
                last = None
                for info in archive:
                    key, _ = base_plus_ext(info.name)
                    if info.isreg() and key is not None and key != last:
                        total, last = total + 1, key
        except (OSError, tarfile.TarError):
            return None
    return total
