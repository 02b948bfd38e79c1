"""train.host_memory: ``keep`` reuses the host memory a step freed instead of faulting it in
again, ``release`` returns it to the OS at once; both give it back when training ends.
``auto`` moves to ``release`` at the first step that spills its inputs, and only then."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmalign.config import TrainConfig
from mmalign.training.host_memory import _glibc, host_memory_policy

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc")

STEPS = """
import json, resource, sys
from mmalign.training.host_memory import host_memory

PAGE, BLOCK, BLOCKS = 4096, 5 << 20, 40   # 200 MiB in 5 MiB pieces, like activations

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * PAGE / (BLOCK * BLOCKS)

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(BLOCK) for _ in range(BLOCKS)]  # zero-filled: every page touched
    half = blocks[::2]  # half of them outlive the step, scattered through the others
    del blocks
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults * PAGE / (BLOCK * BLOCKS), rss(), half

with host_memory(sys.argv[1]) as memory:
    steps = [step() for _ in range(4)]
    inside = rss()
print(json.dumps({"policy": memory.policy, "faults": [f for f, _, _ in steps],
                  "rss_after_step": [r for _, r, _ in steps], "inside": inside, "after": rss()}))
"""
"""Four steps that each allocate 200 MiB and keep half of it; memory in units of 200 MiB."""


def _steps(setting: str, env: dict[str, str] | None = None) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", STEPS, setting], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(run.stdout)


@needs_glibc
@pytest.mark.launches
def test_keep_reuses_freed_memory_and_returns_it_at_the_end():
    kept = _steps("keep")
    assert kept["policy"].startswith("keep")
    # later steps fault in only what the earlier steps still hold (half), never it all again
    assert max(kept["faults"][1:]) < 0.55, kept
    # what the steps freed stayed resident while kept, and is returned on leaving
    assert kept["inside"] - kept["after"] > 0.4, kept


@needs_glibc
@pytest.mark.launches
def test_release_returns_freed_memory_at_once():
    released = _steps("release")
    assert released["policy"].startswith("release")
    # each step faults in all it allocates; the half it freed is not resident after it
    assert min(released["faults"]) > 0.9, released
    growth = [b - a for a, b in zip(released["rss_after_step"], released["rss_after_step"][1:])]
    assert all(0.4 < g < 0.6 for g in growth), released


def test_auto_releases_with_gradient_checkpointing_and_keeps_otherwise(monkeypatch):
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    if _glibc() is None:
        assert host_memory_policy("auto").startswith("left alone")
        return
    assert host_memory_policy("auto").startswith("keep (")
    assert host_memory_policy("auto", gradient_checkpointing=True).startswith("release (")
    assert TrainConfig().host_memory == "auto"


@needs_glibc
@pytest.mark.launches
def test_an_allocator_setting_of_the_user_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory_policy("keep") == "left to the environment (MALLOC_TRIM_THRESHOLD_ set)"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert host_memory_policy("keep") == "left to jemalloc (LD_PRELOAD)"
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0"}
    env.pop("LD_PRELOAD")
    assert min(_steps("keep", env)["faults"][1:]) > 0.9  # the user's choice holds


SPILLING = """
import ctypes, json, sys
from mmalign.training.host_memory import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
BLOCK, BLOCKS = 512 << 10, 20   # below keep's 32 MiB threshold and release's former 1 MiB

def mapped():
    # the share of 20 live blocks of 512 KiB that glibc serves with their own mmap
    before = libc.mallinfo2().hblkhd
    blocks = [bytearray(BLOCK) for _ in range(BLOCKS)]
    return (libc.mallinfo2().hblkhd - before) / (BLOCK * BLOCKS)

with host_memory(sys.argv[1]) as memory:
    notes = [memory.spilling() for _ in range(2)] if sys.argv[2] == "spill" else []
    share = mapped()
print(json.dumps({"mapped": share, "notes": notes, "policy": memory.policy}))
"""
"""The share of 512 KiB allocations glibc maps on their own after the steps (do not) spill."""


def _spilling(setting: str, spill: bool, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, "-c", SPILLING, setting, "spill" if spill else "keep"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(run.stdout)


@needs_glibc
@pytest.mark.launches
def test_auto_maps_allocations_from_128_kib_once_a_step_spills_and_not_before():
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")}
    spilled = _spilling("auto", spill=True, env=env)
    assert spilled["mapped"] > 0.99, spilled  # read back: mapped, so returned when freed
    note, again = spilled["notes"]
    assert note.startswith("host memory: release (glibc: a mapping per allocation of 128 KiB")
    assert again is None  # said once
    kept = _spilling("auto", spill=False, env=env)
    assert kept["mapped"] < 0.1, kept  # no spilling: from the heap, as keep
    assert kept["policy"].endswith("release from a step that spills its inputs")
    chosen = _spilling("keep", spill=True, env=env)  # an explicit keep stays
    assert chosen["mapped"] < 0.1 and chosen["notes"] == [None, None], chosen
    left = _spilling("auto", spill=True, env={**env, "MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert left["mapped"] < 0.1, left  # the user's threshold holds, and the log says so once
    assert left["notes"][0].startswith("host memory left to the environment")
    assert left["notes"][1] is None
