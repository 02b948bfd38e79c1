"""Two real processes (``accelerate launch``, gloo on CPU) train exactly like one process
holding the doubled batch: negatives are gathered across ranks, gradients averaged by DDP,
and accumulation under ``no_sync`` stays contrastive-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed

from mmalign.model import AlignmentModel
from mmalign.training import train
from tests.train_support import (
    finish,
    free_port,
    model_weights,
    start_launch,
    tiny_config,
    write_shards,
)

pytestmark = pytest.mark.launches


def test_two_processes_equal_one_process_with_doubled_batch(tmp_path: Path) -> None:
    # one shard per rank, 8 samples each; every step reads each rank's whole shard
    pattern = write_shards(tmp_path / "data", "train", shards=2, per_shard=8, missing=0.25)
    sections = {"model": {"objective": {"name": "clip"}}}
    two = tiny_config(
        tmp_path / "two",
        pattern,
        train={"steps": 3, "accumulate": 2},
        data={"batch_size": 4},
        **sections,
    )
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(two))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "mmalign", "train", str(config_file),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2

    one = tiny_config(
        tmp_path / "one",
        pattern,
        train={"steps": 3, "accumulate": 1},
        data={"batch_size": 16},
        **sections,
    )
    train(one)

    expected, actual = model_weights(tmp_path / "one"), model_weights(tmp_path / "two")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5, msg=name)
    set_seed(0)
    initial = AlignmentModel.from_config(one["model"]).state_dict()
    moved = max(float((expected[name] - value).abs().max()) for name, value in initial.items())
    assert moved > 1e-2  # the runs trained; equal parameters are not the initial ones


def test_a_refused_resume_is_one_line_from_every_rank(tmp_path: Path) -> None:
    # rank 0 refuses the resume (a changed data field); rank 1 hears of it by broadcast and
    # must stop with the same one-line user error, not a traceback
    pattern = write_shards(tmp_path / "data", "train", shards=2, per_shard=8)
    config = tiny_config(tmp_path / "run", pattern, train={"steps": 1}, data={"batch_size": 4})
    train(config)
    config["data"]["resampled"] = not config["data"].get("resampled", False)
    config_file = tmp_path / "changed.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "launch.log"

    status, output = finish(
        start_launch(["-m", "mmalign", "train", str(config_file), "--resume"], log), log
    )

    assert status != 0
    # both ranks write to one log at once, so one line's start can land inside the other's
    # (seen in CI: "...for a new runmmalign: error: ..."): count the message, not the prefix
    assert output.count("data.resampled: a resumed run cannot change it (") == 2, output
    assert "mmalign: error: data.resampled" in output, output
    assert "[rank1]: Traceback" not in output and "[rank0]: Traceback" not in output, output
