"""Which shards and samples each reader reads: readers are split by node, then by process
within the node, then by DataLoader worker.

A *reader* is one DataLoader worker of one process (a process without workers is one
reader). Readers are numbered node by node, then by process (local rank), then by worker::

    index = rank * num_workers + worker
          = (node * processes_per_node + local_rank) * num_workers + worker

because both launchers number global ranks node by node (``torchrun`` gives node ``GROUP_RANK``
the ranks ``GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK``; ``accelerate launch`` does the same
with ``--machine_rank``). There are ``count = world_size * num_workers`` readers.

The rule for one epoch (``data.resampled: false``):

- **at least ``count`` shards**: the epoch's shard order (shuffled with a seed every reader
  shares when ``shuffle`` is on, so all agree on it) is dealt round robin: reader ``i`` reads
  shards ``i, i + count, i + 2 * count, ...`` whole. When the shard count is not a multiple
  of ``count``, the first ``shards % count`` readers read one shard more (nothing is
  repeated or dropped to even them out; :func:`describe_split` says so in the run's plan);
- **fewer shards than readers**: every reader reads every shard and keeps every
  ``count``-th record, starting at its index, so no reader sits idle.

Either way each record is read by exactly one reader per epoch. What training then does with
a reader's records (its last partial batch is dropped; a process whose readers hold fewer
records starts its next epoch earlier) is described in ``docs/multi_gpu.md``.

Example:
    >>> plan_split(["a", "b", "c"], Split(rank=0, world_size=1, worker=0, num_workers=2))
    SplitPlan(urls=['a', 'c'], stride=1, offset=0)
    >>> plan_split(["a"], Split(rank=1, world_size=2, worker=0, num_workers=1))
    SplitPlan(urls=['a'], stride=2, offset=1)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from webdataset.utils import make_seed


@dataclass(frozen=True)
class Split:
    """One reader: a (global) rank of the job and a DataLoader worker of that rank."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        """This reader's number: node, then local rank, then worker (see the module doc)."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        """Readers of the whole job."""
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


def _count(number: int, noun: str, plural: str = "") -> str:
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def describe_split(shards: int, world_size: int, num_workers: int) -> str:
    """How ``shards`` shards are split over the readers of ``world_size`` processes with
    ``num_workers`` DataLoader workers each (0 workers: one reader per process).

    Example:
        >>> describe_split(8, 2, 2)
        '8 shards over 4 readers (2 processes x 2 workers): 2 shards each'
        >>> describe_split(5, 2, 2)  # doctest: +ELLIPSIS
        '5 shards over 4 readers (...): 1 reader reads 2 shards, 3 read 1; ...'
    """
    workers = max(num_workers, 1)
    count = world_size * workers
    head = (
        f"{_count(shards, 'shard')} over {_count(count, 'reader')} "
        f"({_count(world_size, 'process', 'processes')} x "
        f"{_count(workers, 'worker')})"
    )
    if shards < count:
        return f"{head}: every reader reads every shard and keeps one record in {count}"
    each, more = divmod(shards, count)
    if more == 0:
        return f"{head}: {_count(each, 'shard')} each"
    verb = "reads" if more == 1 else "read"
    return (
        f"{head}: {_count(more, 'reader')} {verb} {each + 1} shards, {count - more} read "
        f"{each}; a process whose readers hold fewer records starts its next epoch earlier "
        f"(use a multiple of {count} shards for equal parts)"
    )
