"""The shuffle buffer's backlog at a resume mark, found from counts alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import webdataset as wds

from mmalign.data.resume import OutOfStep, shuffle_backlog
from mmalign.data.sources import interleave

Position = tuple[int, int, int]


@pytest.mark.parametrize(("drawn", "buffer"), [(10, 6), (3, 6), (20, 1), (25, 40)])
def test_backlog_is_what_the_shuffle_still_holds(drawn: int, buffer: int) -> None:
    shards = [[5, 7, 6], [9, 4]]
    weights = [2.0, 1.0]
    streams = [
        iter([(s, j, r) for j, n in enumerate(sizes) for r in range(n)])
        for s, sizes in enumerate(shards)
    ]
    read: list[Position] = []

    def tracked(items: Iterator[Position]) -> Iterator[Position]:
        for item in items:
            read.append(item)
            yield item

    mixed = tracked(interleave(streams, weights))
    shuffled = iter(wds.shuffle(buffer, initial=buffer, seed=3)(mixed)) if buffer > 1 else mixed
    sent = [next(shuffled) for _ in range(drawn)]
    per_shard = Counter((s, j) for s, j, _ in read)
    counts = [
        [per_shard[s, j] for j in range(max((j for t, j in per_shard if t == s), default=-1) + 1)]
        for s in range(len(shards))
    ]
    backlog = shuffle_backlog(counts, weights, drawn, buffer, seed=3)
    assert backlog == set(read) - set(sent)
    assert len(backlog) == len(read) - drawn


def test_counts_that_cannot_give_the_records_are_out_of_step() -> None:
    with pytest.raises(OutOfStep):
        shuffle_backlog([[3]], [1.0], drawn=5, buffer=0, seed=0)
