"""What the C library does with host memory a training step frees (``train.host_memory``).

glibc's ``malloc`` returns memory to the OS when the free space at the top of its heap grows
past a threshold, and serves allocations above another threshold with fresh ``mmap``\\ s;
both thresholds move with the allocations seen. A training step frees its activations at
once after the backward pass, so on the CPU a step can hand gigabytes back and fault them
in again, zeroed page by page, in the next forward pass (ViT-B-32 at batch 32: ~1.5 GiB and
~400k page faults per step), or keep them scattered through a heap that only grows.
While training, :func:`host_memory` sets the allocator for one of two aims:

- ``keep`` (speed): tensors up to 32 MiB (glibc's largest ``M_MMAP_THRESHOLD``) come from
  the heap and the heap is never trimmed, so each step reuses the memory of the last one;
  the resident size stays at the peak between steps;
- ``release`` (memory): every allocation of 1 MiB or more gets its own mapping, unmapped
  when freed, so the resident size follows the memory in use (no heap fragments), paying
  the page faults of every step;
- ``auto``: ``release`` with ``train.gradient_checkpointing`` (the run traded compute for
  memory already), else ``keep``.

On leaving, glibc's defaults are set again and ``malloc_trim`` returns what is free. The
figures are in docs/BENCHMARKS.md. Nothing changes where the C library is not glibc, or when
the user chose the allocator's behaviour: ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` set, or another allocator preloaded
(jemalloc, tcmalloc, mimalloc in ``LD_PRELOAD``).

Example:
    >>> host_memory_policy("auto", gradient_checkpointing=True).split(" (")[0]
    'release'
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLDS = {"keep": (32 << 20, -1), "release": (1 << 20, 128 << 10)}
"""Per aim: (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``); -1: never trim."""
DESCRIPTIONS = {
    "keep": "heap up to 32 MiB per allocation, never trimmed",
    "release": "a mapping per allocation of 1 MiB or more, unmapped when freed",
}
DEFAULT_THRESHOLD = 128 << 10
"""glibc's default trim and mmap thresholds."""
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    needed = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, name) for name in needed) else None


def _decide(setting: str, gradient_checkpointing: bool) -> tuple[str | None, str]:
    """The aim (``keep``/``release``, ``None`` when the allocator is left alone) and its
    description."""
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return None, f"left to the environment ({', '.join(chosen)} set)"
    preload = os.environ.get("LD_PRELOAD", "")
    other = [name for name in OTHER_ALLOCATORS if name in preload]
    if other:
        return None, f"left to {other[0]} (LD_PRELOAD)"
    if _glibc() is None:
        return None, "left alone (the C library is not glibc)"
    if setting == "auto":
        setting = "release" if gradient_checkpointing else "keep"
    return setting, f"{setting} (glibc: {DESCRIPTIONS[setting]})"


def host_memory_policy(setting: str, gradient_checkpointing: bool = False) -> str:
    """What :func:`host_memory` does here for ``train.host_memory: setting``: ``keep (...)``,
    ``release (...)``, or why it leaves the allocator alone.

    Example:
        >>> host_memory_policy("keep")
        'keep (glibc: heap up to 32 MiB per allocation, never trimmed)'
    """
    return _decide(setting, gradient_checkpointing)[1]


@contextmanager
def host_memory(setting: str, gradient_checkpointing: bool = False) -> Iterator[str]:
    """Set glibc's thresholds for ``train.host_memory: setting`` while inside (see the
    module doc); yields :func:`host_memory_policy`'s description."""
    aim, policy = _decide(setting, gradient_checkpointing)
    libc = _glibc() if aim is not None else None
    if aim is None or libc is None:
        yield policy
        return
    mmap_threshold, trim_threshold = THRESHOLDS[aim]
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    try:
        yield policy
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
