"""Shared helpers of the training tests: tiny paired tabular shards and configs.

Two modalities ``x`` and ``y`` (``y`` a fixed linear map of ``x`` plus noise), written with
webdataset's ``TarWriter`` as ``<key>.x.npy`` / ``<key>.y.npy`` / ``<key>.cls``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from safetensors.torch import load_file

FEATURES = 4


def write_shards(
    directory: Path,
    name: str,
    shards: int,
    per_shard: int,
    *,
    seed: int = 0,
    missing: float = 0.0,
) -> str:
    """Write ``shards`` tar files of ``per_shard`` records; returns their brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).normal(size=(FEATURES, FEATURES))
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{name}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                x = rng.normal(size=FEATURES).astype(np.float32)
                y = (x @ mixing + 0.05 * rng.normal(size=FEATURES)).astype(np.float32)
                record: dict[str, Any] = {
                    "__key__": f"{name}{shard}_{index:05d}",
                    "x.npy": x,
                    "cls": int(np.argmax(x)),
                }
                if rng.random() >= missing:
                    record["y.npy"] = y
                writer.write(record)
    return str(directory / f"{name}-{{000000..{shards - 1:06d}}}.tar")


def tiny_config(
    output: Path, train_shards: str, val_shards: str | None = None, **sections: Any
) -> dict:
    """A run config for two tiny tabular towers; ``sections`` update model/data/train/eval."""
    config: dict[str, Any] = {
        "model": {
            "dim": 8,
            "towers": {
                "x": {"type": "tabular", "in_features": FEATURES, "hidden": 16},
                "y": {"type": "tabular", "in_features": FEATURES, "hidden": 16},
            },
        },
        "data": {
            "train": train_shards,
            "val": val_shards,
            "fields": {"x": "x.npy", "y": "y.npy"},
            "batch_size": 8,
            "shuffle_buffer": 0,
            "resampled": False,
        },
        "train": {
            "steps": 6,
            "lr": 0.01,
            "output": str(output),
            "log_every": 1,
            "tensorboard": False,
            "plots": False,
        },
        "eval": {},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def model_weights(run_dir: Path) -> dict:
    """The final weights of a run (``model/model.safetensors``)."""
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def free_port() -> int:
    """A free TCP port on localhost (for the rendezvous of launched processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_launch(arguments: Sequence[str], log: Path, processes: int = 2) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node processes`` of ``arguments`` (a script and its
    arguments, or ``-m module ...``) on CPU (gloo), one thread per process, its output to
    ``log``; :func:`finish` waits for it."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *arguments,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    """Wait for a :func:`start_launch` process: its exit status and the end of its log."""
    status = process.wait(timeout=timeout)
    return status, Path(log).read_text()[-3000:]
