"""The split of shards over readers (node, then process in the node, then DataLoader worker):
each record read once per epoch for every shard count, the order, and the plan's words."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from mmalign.data.splitting import Split, describe_split, plan_split

SETUPS = [(1, 1, 3), (1, 2, 2), (2, 1, 2), (2, 2, 3), (3, 1, 1)]
"""(nodes, processes per node, workers per process)."""


def _shards(count: int) -> dict[str, list[str]]:
    """``count`` shards of uneven sizes (3 to 6 records)."""
    return {f"s{s}": [f"s{s}r{r}" for r in range(3 + s % 4)] for s in range(count)}


def _readers(nodes: int, per_node: int, workers: int) -> list[Split]:
    """Every reader, numbered node by node, then by local rank, then by worker."""
    world = nodes * per_node
    return [
        Split(rank=node * per_node + local, world_size=world, worker=worker, num_workers=workers)
        for node, local, worker in itertools.product(range(nodes), range(per_node), range(workers))
    ]


def _read(shards: dict[str, list[str]], split: Split, epoch: int) -> list[str]:
    """What one reader reads: its shards in order, then every ``stride``-th record (as
    :func:`mmalign.data.records.raw_records` does)."""
    plan = plan_split(list(shards), split, shuffle=True, seed=11, epoch=epoch)
    records = [key for url in plan.urls for key in shards[url]]
    return records[plan.offset :: plan.stride]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 6, 7, 12, 13, 24])
def test_every_record_is_read_by_exactly_one_reader_per_epoch(setup: tuple, count: int) -> None:
    shards = _shards(count)
    dataset = Counter(key for keys in shards.values() for key in keys)
    readers = _readers(*setup)
    assert [reader.index for reader in readers] == list(range(len(readers)))
    for epoch in (0, 1):
        parts = [_read(shards, reader, epoch) for reader in readers]
        assert sum(map(Counter, parts), Counter()) == dataset
        if count >= len(readers):  # whole shards: one reader each, counts differ by at most one
            plans = [
                plan_split(list(shards), r, shuffle=True, seed=11, epoch=epoch) for r in readers
            ]
            sizes = [len(plan.urls) for plan in plans]
            assert max(sizes) - min(sizes) == (count % len(readers) != 0)
            assert sizes == sorted(sizes, reverse=True)  # the first readers take the extra ones


def test_readers_go_node_by_node_then_process_then_worker() -> None:
    shards = [f"s{s}" for s in range(12)]
    readers = _readers(nodes=2, per_node=2, workers=3)
    first = [plan_split(shards, reader).urls for reader in readers]
    # node 0: local rank 0 workers 0-2 read s0-s2, local rank 1 s3-s5; node 1: s6-s11
    assert first == [[f"s{s}"] for s in range(12)]
    node1_local0_worker2 = Split(rank=1 * 2 + 0, world_size=4, worker=2, num_workers=3)
    assert plan_split(shards, node1_local0_worker2).urls == ["s8"]


def test_shuffled_order_is_shared_by_readers_and_changes_with_the_epoch() -> None:
    shards = [f"s{s}" for s in range(8)]
    readers = _readers(nodes=2, per_node=1, workers=2)

    def dealt(epoch: int) -> list[list[str]]:
        return [plan_split(shards, r, shuffle=True, seed=5, epoch=epoch).urls for r in readers]

    assert sorted(url for part in dealt(0) for url in part) == shards
    assert dealt(0) == dealt(0) and dealt(0) != dealt(1)


def test_describe_split_says_when_readers_get_unequal_parts() -> None:
    assert (
        describe_split(8, 2, 2)
        == "8 shards over 4 readers (2 processes x 2 workers): 2 shards each"
    )
    assert describe_split(4, 1, 0) == "4 shards over 1 reader (1 process x 1 worker): 4 shards each"
    uneven = describe_split(9, 2, 2)
    assert uneven.startswith("9 shards over 4 readers (2 processes x 2 workers): 1 reader reads ")
    assert "3 shards, 3 read 2;" in uneven and "use a multiple of 4 shards" in uneven
    assert describe_split(3, 2, 2).endswith(
        "every reader reads every shard and keeps one record in 4"
    )
