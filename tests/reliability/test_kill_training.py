"""SIGKILL during training, including while a checkpoint is written, never loses the newest
complete checkpoint, and ``--resume`` finishes with the parameters of an uninterrupted run.

The first child run is ``python -m mmalign train`` started through ``inject.py``, which
SIGKILLs it at an exact point (a seeded choice of which call), here after tearing the
optimizer file of a checkpoint in its temporary directory; the second is ``mmalign train
--resume`` in a forked child (same kill mechanism, no import cost); the final resume runs in
this process.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_tensors,
    final_weights,
    fork_mmalign,
    run_mmalign,
    tiny_config,
    write_config,
)
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.model import AlignmentModel
from mmalign.training import checkpoint, train
from mmalign.training.optim import build_optimizer

pytestmark = pytest.mark.launches

STEPS, SAVE_EVERY = 14, 3
FILES = {
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer.json",
    "rng-rank0.safetensors",
    "rng-rank0.json",
}


def kill_plan(seed: int) -> list[tuple[str, int]]:
    """Two kill points: a torn write in checkpoint k, then a complete but unrenamed
    temporary checkpoint (or a kill between steps) in the resumed run; seeded."""
    rng = random.Random(seed)
    torn_checkpoint = rng.choice([1, 2])  # save_file: 2 calls per checkpoint (rng, optimizer)
    torn = f"mmalign.training.checkpoint:save_file:{2 * torn_checkpoint}:truncate"
    second = rng.choice(
        [
            f"mmalign.training.checkpoint:replace_directory:{rng.choice([1, 2])}:before",
            f"mmalign.training.trainer:Trainer._train_step:{rng.randint(2, 5)}:before",
        ]
    )
    return [(torn, torn_checkpoint * SAVE_EVERY), (second, 0)]


def assert_latest_loadable(run: Path, config_path: Path) -> int:
    """Every ``step-*`` directory is complete and the newest loads into a fresh model and
    optimizer; returns its step."""
    directory = run / "checkpoints"
    found = checkpoint.list_checkpoints(directory)
    assert found, "a killed run left no complete checkpoint"
    for path in found:
        assert {p.name for p in path.iterdir()} == FILES, path
    config = load_config(config_path)
    model = AlignmentModel.from_config(config.model)
    optimizer = build_optimizer(model, config.train)
    state = checkpoint.load_checkpoint(found[-1], 0, model, optimizer)
    stored = load_file(found[-1] / "model.safetensors")
    assert_same_tensors({k: v for k, v in model.state_dict().items()}, stored)
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert moments and all(torch.isfinite(m).all() for m in moments)
    assert state["step"] == int(found[-1].name.split("-")[1])
    return state["step"]


def test_sigkill_at_seeded_points_then_resume_matches_uninterrupted(
    tmp_path: Path, shards: str
) -> None:
    reference = train(tiny_config(tmp_path / "reference", shards, train={"steps": STEPS}))
    expected = final_weights(reference.output_dir)

    run = tmp_path / "killed"
    config_path = write_config(
        tmp_path / "killed.yaml", tiny_config(run, shards, train={"steps": STEPS})
    )
    (torn, torn_step), (second, _) = kill_plan(seed=0)

    first = run_mmalign(["train", str(config_path)], kills=[torn])
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    torn_dir = run / "checkpoints" / f".tmp-{checkpoint.checkpoint_name(torn_step)}"
    assert (torn_dir / "optimizer.safetensors").is_file(), "the kill missed the checkpoint write"
    assert not (run / "checkpoints" / checkpoint.checkpoint_name(torn_step)).exists()
    assert assert_latest_loadable(run, config_path) == torn_step - SAVE_EVERY

    status = fork_mmalign(["train", str(config_path), "--resume"], kills=[second])
    assert status == -signal.SIGKILL
    assert "resuming at step" in (run / "train.log").read_text()
    step = assert_latest_loadable(run, config_path)
    assert step >= torn_step - SAVE_EVERY
    assert not (run / "model").exists()

    result = train(config_path, resume=True)
    assert result.steps == STEPS
    assert_same_tensors(final_weights(run), expected)
    assert not list((run / "checkpoints").glob(".tmp-*")), "partial checkpoints were left"
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1)), "each step must be logged exactly once"


def test_sigkill_while_pruning_leaves_no_half_deleted_step(tmp_path: Path, shards: str) -> None:
    """Killed after the first file of a pruned checkpoint was deleted: the checkpoint had
    been renamed out of the ``step-*`` names first, so every ``step-*`` stays whole."""
    expected = final_weights(
        train(tiny_config(tmp_path / "reference", shards, train={"steps": STEPS})).output_dir
    )
    run = tmp_path / "killed"
    config_path = write_config(
        tmp_path / "killed.yaml", tiny_config(run, shards, train={"steps": STEPS})
    )
    pruned = random.Random(1).randint(1, 3)  # which pruned checkpoint (3 files each)
    kill = f"os:unlink:{3 * pruned - 2}:after:safetensors"
    assert fork_mmalign(["train", str(config_path)], kills=[kill]) == -signal.SIGKILL
    assert len(list((run / "checkpoints").glob(".pruned-step-*"))) == 1
    assert_latest_loadable(run, config_path)

    train(config_path, resume=True)
    assert_same_tensors(final_weights(run), expected)
    assert not list((run / "checkpoints").glob(".*")), "leftovers of the pruning were kept"


def test_sigkill_between_the_renames_of_best_recovers_it(tmp_path: Path, shards: str) -> None:
    """Killed after ``best/`` was renamed to ``.old-best`` and before the new one took its
    place: the resume brings ``best/`` back (the new, fsynced one) before reading anything."""
    sections = {
        "train": {"steps": STEPS},
        "data": {"val": shards.replace("{000000..000002}", "000002")},
        "eval": {"every": 2, "max_samples": 16},
    }
    expected = final_weights(
        train(tiny_config(tmp_path / "reference", shards, **sections)).output_dir
    )
    run = tmp_path / "killed"
    config_path = write_config(tmp_path / "killed.yaml", tiny_config(run, shards, **sections))
    replaced = random.Random(2).randint(1, 5)  # which update of an existing best/
    kill = f"os:replace:{replaced}:after:.old-best"
    assert fork_mmalign(["train", str(config_path)], kills=[kill]) == -signal.SIGKILL
    directory = run / "checkpoints"
    assert not (directory / "best").exists() and (directory / ".old-best").is_dir()

    # a resume killed at its first step has already recovered best/
    first_step = "mmalign.training.trainer:Trainer._train_step:1:before"
    assert (
        fork_mmalign(["train", str(config_path), "--resume"], kills=[first_step]) == -signal.SIGKILL
    )
    assert {p.name for p in (directory / "best").iterdir()} == FILES
    newest = checkpoint.read_trainer_state(checkpoint.latest_checkpoint(directory))
    assert checkpoint.read_trainer_state(directory / "best")["step"] == newest["best"]["step"]
    assert not list(directory.glob(".*"))

    result = train(config_path, resume=True)
    assert_same_tensors(final_weights(run), expected)
    assert result.best_checkpoint == directory / "best"
