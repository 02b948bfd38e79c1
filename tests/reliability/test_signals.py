"""SIGTERM / SIGINT to a training process (real signals, sent with ``os.kill``): the step it
was on is finished and checkpointed, the lock released, the exit status is 143 / 130, and
``--resume`` ends with the weights of an uninterrupted run. A second signal exits at once.

The child is ``mmalign train`` forked from this process and held by ``inject.py``'s ``pause``
point at the start of step 5 (as a scheduler's signal finds a job in the middle of a step);
the signal arrives while it is held, then the step is released.

``mmalign prep make-demo`` (a real ``python -m mmalign`` process, as ``timeout`` or Ctrl-C
finds it) stops its worker processes and removes its unfinished datasets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    assert_same_tensors,
    final_weights,
    start_forked,
    subprocess_env,
    tiny_config,
    wait_for_file,
    wait_forked,
    write_config,
)

from mmalign.training import checkpoint, train

pytestmark = pytest.mark.launches

STEPS, PAUSED_STEP = 8, 5


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_resume_matches(
    tmp_path: Path, shards: str, signum: int, status: int
) -> None:
    expected = final_weights(
        train(tiny_config(tmp_path / "reference", shards, train={"steps": STEPS})).output_dir
    )
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": STEPS}))
    fault_dir = tmp_path / "fault"
    fault_dir.mkdir()
    pause = f"mmalign.training.trainer:Trainer._train_step:{PAUSED_STEP}:pause"
    pid = start_forked(["train", str(config)], [pause], fault_dir)
    wait_for_file(fault_dir / "paused", pid)
    os.kill(pid, signum)
    (fault_dir / "release").touch()
    assert wait_forked(pid) == status

    newest = checkpoint.latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == checkpoint.checkpoint_name(PAUSED_STEP)
    assert checkpoint.read_trainer_state(newest)["step"] == PAUSED_STEP
    assert not (run / ".lock").exists()
    assert not (run / "model").exists()
    name = signal.Signals(signum).name
    assert f"{name}: stopped after step {PAUSED_STEP} of {STEPS}" in (run / "train.log").read_text()

    result = train(config, resume=True)
    assert result.steps == STEPS
    assert_same_tensors(final_weights(run), expected)


def test_second_signal_exits_at_once(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": STEPS}))
    fault_dir = tmp_path / "fault"
    fault_dir.mkdir()
    pause = f"mmalign.training.trainer:Trainer._train_step:{PAUSED_STEP}:pause"
    pid = start_forked(["train", str(config)], [pause], fault_dir)
    wait_for_file(fault_dir / "paused", pid)
    os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)  # two signals before the handler runs would be delivered as one
    os.kill(pid, signal.SIGTERM)
    # never released: only the second signal can end it
    assert wait_forked(pid, timeout=30) == -signal.SIGTERM
    newest = checkpoint.latest_checkpoint(run / "checkpoints")
    assert newest is None or newest.name != checkpoint.checkpoint_name(PAUSED_STEP)


def _make_demo_writing(out: Path, stderr: int) -> subprocess.Popen[str]:
    """``prep make-demo --variants 100`` into ``out``, in a session of its own, once its
    first shard is begun (within 60 s)."""
    command = [sys.executable, "-m", "mmalign", "prep", "make-demo", "--out", str(out)]
    child = subprocess.Popen(
        [*command, "--variants", "100", "--no-progress"],
        env=subprocess_env(),
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob(".*.partial/train-000000.tar")):
        if child.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise AssertionError("make-demo began no shard")
        time.sleep(0.05)
    return child


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopped_make_demo_leaves_nothing_and_no_worker(
    tmp_path: Path, signum: int, status: int
) -> None:
    """``make-demo --variants 100`` stopped while writing (SIGTERM to it as ``timeout`` sends,
    SIGINT to its process group as Ctrl-C does) left hidden ``.NAME.partial`` folders, and
    its workers wrote on: it exits 143 / 130 and nothing of it stays or grows."""
    out = tmp_path / "demo"
    child = _make_demo_writing(out, subprocess.PIPE)
    try:
        if signum == signal.SIGINT:
            os.killpg(child.pid, signum)
        else:
            child.send_signal(signum)
        assert child.wait(timeout=60) == status
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.stderr is not None
    assert (
        child.stderr.read() == f"make-demo stopped; its unfinished datasets in {out} were removed\n"
    )
    time.sleep(0.5)  # a worker left running would write on
    assert not out.exists()


def _written_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_make_demo_workers_end_with_a_killed_parent(tmp_path: Path) -> None:
    """``make-demo`` SIGKILLed (no handler runs) left its two workers writing for minutes,
    reparented, 400 MB each: they now get SIGTERM from Linux when their parent dies, so
    nothing grows after the kill (the ``.partial`` folders stay until the next run)."""
    out = tmp_path / "demo"
    child = _make_demo_writing(out, subprocess.DEVNULL)
    try:
        child.kill()
        child.wait()
        time.sleep(1.0)  # the workers' SIGTERM arrives at once; give them time to end
        before = _written_bytes(out)
        time.sleep(2.0)
        assert _written_bytes(out) == before, "a worker wrote on after its parent was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # what is left of the group
