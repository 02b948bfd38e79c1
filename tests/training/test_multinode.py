"""Two "nodes" on this machine: two ``torchrun --nnodes 2 --nproc_per_node 1`` agents that meet
at a c10d rendezvous (gloo on CPU). One epoch of every process's logged sample keys is the
training set, each key once, split node by node then worker by worker; a node that does
not see the run directory (a node-local ``train.output``) stops every process at the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mmalign.data.shards import expand_shards
from mmalign.data.splitting import Split, plan_split
from mmalign.training import train
from mmalign.training.sample_keys import SampleKeyLog, read_sample_keys
from mmalign.training.stream import epoch_seed
from tests.train_support import free_port, tiny_config, write_shards

SHARDS, PER_SHARD, WORKERS, BATCH = 4, 8, 2, 4


def _two_nodes(config_file: Path, outputs: tuple[str, str] | None = None) -> list[tuple]:
    """Start both nodes' torchrun (node ranks 0 and 1) and wait; (status, output) of each."""
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "-m", "mmalign", "train", str(config_file),
        ]  # fmt: skip
        if outputs is not None:
            command += ["--set", f"train.output={outputs[node]}"]
        nodes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    try:
        for process in nodes:
            output, _ = process.communicate(timeout=300)
            results.append((process.returncode, output))
    finally:
        for process in nodes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _shard_of(key: str) -> int:
    """The shard a key of :func:`write_shards` was written to (``train<shard>_<index>``)."""
    return int(key.split("_")[0].removeprefix("train"))


@pytest.mark.launches
def test_two_nodes_train_and_one_epoch_reads_every_key_once(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "data", "train", shards=SHARDS, per_shard=PER_SHARD)
    # 4 readers (2 nodes x 1 process x 2 workers), one shard of 8 records each: an epoch is
    # 4 batches of 4 per process; 6 steps go on into the second epoch
    config = tiny_config(
        tmp_path / "run",
        pattern,
        train={"steps": 6, "log_sample_keys": True},
        data={"batch_size": BATCH, "workers": WORKERS, "shuffle_buffer": 4, "seed": 3},
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))

    results = _two_nodes(config_file)

    for status, output in results:
        assert status == 0, output[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert (run / "model" / "model.safetensors").is_file()
    assert "done: 6 steps" in (run / "train.log").read_text()

    logged = read_sample_keys(run)
    assert sorted(logged) == [0, 1]
    dataset = Counter(f"train{s}_{i:05d}" for s in range(SHARDS) for i in range(PER_SHARD))
    for records in logged.values():
        epochs = [(record["epoch"], record["batch"]) for record in records]
        assert epochs == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    first = {
        rank: [key for record in records if record["epoch"] == 0 for key in record["keys"]]
        for rank, records in logged.items()
    }
    assert Counter(first[0]) + Counter(first[1]) == dataset  # every key once, none twice

    # rank r's readers are r * 2 + worker: they read the shards that plan gives them, in the
    # shard order both nodes drew from the same seed (node, then worker)
    urls = expand_shards(pattern)
    for rank in (0, 1):
        plans = [
            plan_split(urls, Split(rank, 2, worker, WORKERS), shuffle=True, seed=epoch_seed(3, 0))
            for worker in range(WORKERS)
        ]
        planned = {urls.index(url) for plan in plans for url in plan.urls}
        assert {_shard_of(key) for key in first[rank]} == planned


@pytest.mark.launches
def test_a_node_that_does_not_see_the_run_directory_stops_both(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "data", "train", shards=2, per_shard=8)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", pattern)))
    # each "node" has its own train.output, as with node-local disks
    outputs = (str(tmp_path / "node0"), str(tmp_path / "node1"))

    results = _two_nodes(config_file, outputs)

    for status, output in results:
        assert status != 0, output[-3000:]
        assert "mmalign: error: train.output" in output, output[-3000:]
        assert "is not shared by every process: rank 1 on" in output
    assert not any((tmp_path / name / "checkpoints").exists() for name in ("node0", "node1"))


def test_sample_keys_of_a_resumed_run_equal_an_uninterrupted_one(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "data", "train", shards=2, per_shard=8)
    sections = {"train": {"log_sample_keys": True}, "data": {"batch_size": 4, "shuffle_buffer": 4}}
    whole = tiny_config(tmp_path / "whole", pattern, **sections)
    train(whole, ["train.steps=6"])
    parts = tiny_config(tmp_path / "parts", pattern, **sections)
    train(parts, ["train.steps=3"])
    log = SampleKeyLog(tmp_path / "parts", rank=0, position={"epoch": 0, "batches": 3})
    with log.path.open("a") as handle:  # what a kill after the checkpoint leaves behind
        handle.write(json.dumps({"epoch": 0, "batch": 4, "keys": ["stale"]}) + '\n{"epo')
    train(parts, ["train.steps=6"], resume=True)

    expected, resumed = read_sample_keys(tmp_path / "whole"), read_sample_keys(tmp_path / "parts")
    assert [(r["epoch"], r["batch"]) for r in expected[0]] == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)
    ]  # fmt: skip
    assert resumed == expected
