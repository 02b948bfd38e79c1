"""Which shards and samples each rank and DataLoader worker reads.

Every (rank, worker) pair is one *split* with ``index = rank * num_workers + worker`` out of
``count = world_size * num_workers``. With at least ``count`` shards, splits take disjoint
shards; with fewer, every split reads all shards and keeps every ``count``-th sample, so no
worker sits idle and each sample is still read by exactly one split per epoch. Shard order
is shuffled with a seed shared by all splits (same seed, same epoch: same order), so the
assignment is deterministic for a given seed, world size and worker count.

Example:
    >>> plan_split(["a", "b", "c"], Split(rank=0, world_size=1, worker=0, num_workers=2))
    SplitPlan(urls=['a', 'c'], stride=1, offset=0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from webdataset.utils import make_seed


@dataclass(frozen=True)
class Split:
    """One reader: a rank of the job and a DataLoader worker of that rank."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class SplitPlan:
    """The shards one split reads, and which of their samples it keeps."""

    urls: list[str]
    stride: int
    offset: int


def current_split(rank: int, world_size: int) -> Split:
    """The split of the calling process: the given rank and this DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return Split(rank, world_size, 0, 1)
    return Split(rank, world_size, info.id, info.num_workers)


def plan_split(
    urls: list[str], split: Split, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> SplitPlan:
    """Shards (in reading order) and sample stride/offset for one split of one epoch."""
    order = list(urls)
    if shuffle:
        random.Random(make_seed(seed, epoch)).shuffle(order)
    if len(order) >= split.count:
        return SplitPlan(order[split.index :: split.count], 1, 0)
    return SplitPlan(order, split.count, split.index)
