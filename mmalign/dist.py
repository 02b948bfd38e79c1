"""Which process this is: rank and world size, from the caller, torch.distributed or the
launcher's environment. The one place mmalign asks.

Example:
    >>> resolve_world()
    (0, 1)
    >>> resolve_world(rank=1, world_size=2)
    (1, 2)
"""

from __future__ import annotations

import os

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` default group with more than one process exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``)."""
    return dist.get_rank() if world_size() > 1 else 0


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's, else ``(0, 1)``."""
    if rank is None or world_size is None:
        initialized = dist.is_available() and dist.is_initialized()
        default_rank = dist.get_rank() if initialized else 0
        default_world = dist.get_world_size() if initialized else 1
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    return rank, world_size


def join_launched_group() -> tuple[int, int]:
    """``(rank, world_size)`` of a process started by ``accelerate launch`` / ``torchrun``.

    When the launcher's environment says ``WORLD_SIZE > 1`` but no group exists yet, the
    group is created (through Accelerate, which picks gloo without a GPU). In a plain process
    this is ``(0, 1)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        from accelerate import PartialState

        PartialState()
    return resolve_world()


def barrier() -> None:
    """Wait for every process of the default group (no-op in one process)."""
    if is_distributed():
        dist.barrier()
