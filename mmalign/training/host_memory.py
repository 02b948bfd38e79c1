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
- ``release`` (memory): every allocation of 128 KiB or more gets its own mapping, unmapped
  when freed, so the resident size follows the memory in use (no heap fragments), paying
  the page faults of every step (128 KiB is glibc's initial threshold, fixed: by default it
  grows to 32 MiB as mapped blocks are freed);
- ``auto``: ``release`` with ``train.gradient_checkpointing`` (the run traded compute for
  memory already) and from the first step that spills its inputs (``train.spill_inputs``:
  the run asked for a peak flat in the global batch, which with the inputs read back and
  freed every step needs this threshold: docs/tiled_losses.md), else ``keep``.

On leaving, glibc's defaults are set again and ``malloc_trim`` returns what is free. The
figures are in docs/BENCHMARKS.md. Nothing changes where the C library is not glibc, or when
the user chose the allocator's behaviour: ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` set, or another allocator preloaded
(jemalloc, tcmalloc, mimalloc in ``LD_PRELOAD``).

Example:
    >>> host_memory_policy("auto", gradient_checkpointing=True).split(" (")[0]
    'release'
    >>> with host_memory("release") as memory:
    ...     memory.spilling() is None  # release already: nothing to change or say
    True
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLDS = {"keep": (32 << 20, -1), "release": (128 << 10, 128 << 10)}
"""Per aim: (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``); -1: never trim."""
DESCRIPTIONS = {
    "keep": "heap up to 32 MiB per allocation, never trimmed",
    "release": "a mapping per allocation of 128 KiB or more, unmapped when freed",
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
    if setting == "auto" and not gradient_checkpointing:
        return "keep", f"{_described('keep')}; release from a step that spills its inputs"
    aim = "release" if setting == "auto" else setting
    return aim, _described(aim)


def _described(aim: str) -> str:
    return f"{aim} (glibc: {DESCRIPTIONS[aim]})"


def host_memory_policy(setting: str, gradient_checkpointing: bool = False) -> str:
    """What :func:`host_memory` does here for ``train.host_memory: setting``: ``keep (...)``,
    ``release (...)``, or why it leaves the allocator alone.

    Example:
        >>> host_memory_policy("keep")
        'keep (glibc: heap up to 32 MiB per allocation, never trimmed)'
    """
    return _decide(setting, gradient_checkpointing)[1]


class HostMemory:
    """The allocator's settings while inside :func:`host_memory`: ``policy`` describes them,
    :meth:`spilling` moves ``auto`` from ``keep`` to ``release``."""

    def __init__(self, setting: str, gradient_checkpointing: bool) -> None:
        self.setting = setting
        self.aim, self.policy = _decide(setting, gradient_checkpointing)
        self._libc = _glibc() if self.aim is not None else None
        self._noted = False
        self._apply()

    def _apply(self, trim: bool = False) -> None:
        """Set the aim's thresholds; ``trim``: and return what the heap holds free now."""
        if self.aim is not None and self._libc is not None:
            mmap_threshold, trim_threshold = THRESHOLDS[self.aim]
            self._libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
            self._libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
            if trim:
                self._libc.malloc_trim(0)

    def spilling(self) -> str | None:
        """A step spills its inputs: under ``auto`` the allocator releases from now on. The
        line to log the first time (also when the allocator is left alone), else ``None``
        (later steps, and a ``keep`` or ``release`` the configuration chose)."""
        if self._noted or self.setting != "auto" or self.aim == "release":
            return None
        self._noted = True
        if self.aim is None:
            return f"host memory {self.policy}: peak RSS may grow with spilled inputs"
        self.aim, self.policy = "release", _described("release")
        self._apply(trim=True)
        return f"host memory: {self.policy} from this step on, which spills its inputs"

    def restore(self) -> None:
        """glibc's defaults again, and what is free returned to the OS."""
        if self.aim is not None and self._libc is not None:
            self._libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
            self._libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
            self._libc.malloc_trim(0)


@contextmanager
def host_memory(setting: str, gradient_checkpointing: bool = False) -> Iterator[HostMemory]:
    """Set glibc's thresholds for ``train.host_memory: setting`` while inside (see the
    module doc); yields the :class:`HostMemory` (its ``policy``: :func:`host_memory_policy`'s
    description)."""
    memory = HostMemory(setting, gradient_checkpointing)
    try:
        yield memory
    finally:
        memory.restore()
