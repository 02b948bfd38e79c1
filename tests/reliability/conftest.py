"""Helpers of the reliability suite: tiny shards and configs, fault injection, pickle bombs.

The training runs here use a tiny tabular + graph model (no tokenizer, no image backbone) on
shards written into ``tmp_path``; a run of a dozen steps takes about a second once imported.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")
sys.path.insert(0, str(INJECT.parent))  # inject.py, for forked runs
TABULAR_FEATURES = 6


def tabular_vector(index: int) -> np.ndarray:
    """A deterministic float32 vector of ``TABULAR_FEATURES`` entries for sample ``index``."""
    return np.random.default_rng(index).normal(size=TABULAR_FEATURES).astype(np.float32)


def graph_of(index: int) -> dict[str, Any]:
    """A small ring graph whose size and features depend on ``index``."""
    nodes = 3 + index % 4
    x = np.random.default_rng(1000 + index).normal(size=(nodes, 2)).round(3).tolist()
    ring = [[i, (i + 1) % nodes] for i in range(nodes)]
    edge_index = [
        [a for a, _ in ring] + [b for _, b in ring],
        [b for _, b in ring] + [a for a, _ in ring],
    ]
    return {"x": x, "edge_index": edge_index}


def good_record(index: int) -> dict[str, Any]:
    """A record with both modalities and a label."""
    return {
        "__key__": f"sample{index:05d}",
        "npy": tabular_vector(index),
        "graph.json": json.dumps(graph_of(index)).encode(),
        "cls": str(index % 3).encode(),
    }


def write_shard(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` (values: bytes, str, numpy arrays) into a WebDataset tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(dict(record))
    return path


def write_shards(directory: Path, samples: int = 48, shards: int = 3) -> str:
    """``samples`` good records spread over ``shards`` shards; returns the brace pattern."""
    per_shard = -(-samples // shards)
    for shard in range(shards):
        indices = range(shard * per_shard, min(samples, (shard + 1) * per_shard))
        write_shard(directory / f"train-{shard:06d}.tar", [good_record(i) for i in indices])
    return str(directory / f"train-{{000000..{shards - 1:06d}}}.tar")


def tiny_config(output: Path, shards: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A whole-run config of the tiny tabular + graph model; ``sections`` update sections."""
    config: dict[str, Any] = {
        "model": {
            "dim": 8,
            "towers": {
                "labs": {
                    "type": "tabular",
                    "in_features": TABULAR_FEATURES,
                    "hidden": 16,
                    "dropout": 0.1,
                },
                "graph": {
                    "type": "graph",
                    "in_features": 2,
                    "hidden": 16,
                    "layers": 2,
                    "augment_node_drop": 0.2,
                },
            },
            "objective": {"name": "clip"},
        },
        "data": {
            "train": shards,
            "fields": {"labs": "npy", "graph": "graph.json"},
            "label_field": None,
            "batch_size": 8,
            "shuffle_buffer": 8,
            "resampled": False,
        },
        "train": {
            "steps": 12,
            "lr": 3e-3,
            "warmup": 2,
            "save_every": 3,
            "keep_last": 2,
            "log_every": 1,
            "tensorboard": False,
            "plots": False,
            "output": str(output),
        },
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a config dict as YAML."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    """The tensors of a finished run's ``model/model.safetensors``."""
    return load_file(output / "model" / "model.safetensors")


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names and bit-identical values."""
    assert sorted(found) == sorted(expected)
    different = [name for name in expected if not torch.equal(found[name], expected[name])]
    assert not different, f"tensors differ: {different[:5]}"


def subprocess_env() -> dict[str, str]:
    """The environment of child runs: offline, one thread (bitwise-reproducible on CPU)."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def run_mmalign(
    arguments: Sequence[str],
    kills: Sequence[str] = (),
    cwd: Path | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """``python -m mmalign ARGUMENTS`` through the fault injector (``inject.py --kill SPEC``)."""
    command = [sys.executable, str(INJECT)]
    for spec in kills:
        command += ["--kill", spec]
    command += ["--", *arguments]
    return subprocess.run(
        command,
        cwd=cwd or REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_forked(
    arguments: Sequence[str], kills: Sequence[str] = (), fault_dir: Path | None = None
) -> int:
    """Start ``mmalign ARGUMENTS`` in a forked child of this process (no import cost) with
    ``inject.py`` kill/pause points; returns its PID."""
    from inject import install

    from mmalign.cli.main import main

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            if fault_dir is not None:
                os.environ["MMALIGN_FAULT_DIR"] = str(fault_dir)
            for spec in kills:
                install(spec)
            status = main(list(arguments))
        finally:
            os._exit(status)
    return pid


def wait_forked(pid: int, timeout: float = 120) -> int:
    """Wait for a forked child; its exit status (``-9`` when SIGKILLed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"forked mmalign run {pid} did not finish in {timeout} s")


def fork_mmalign(arguments: Sequence[str], kills: Sequence[str] = (), timeout: float = 120) -> int:
    """Run ``mmalign ARGUMENTS`` in a forked child with the same kill points as
    :func:`run_mmalign`; returns the exit status (``-9`` when SIGKILLed)."""
    return wait_forked(start_forked(arguments, kills), timeout)


def wait_for_file(path: Path, pid: int, timeout: float = 60) -> None:
    """Wait until ``path`` exists (the child ``pid`` paused); fail if the child ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done, f"child {pid} ended before creating {path}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


class CodeExecutingPickle:
    """Unpickling this object runs ``pathlib.Path(marker).touch()``: a stand-in for a
    malicious checkpoint. Tests check that the marker file never appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (Path(self.marker),))


def plant_pickle(path: Path, marker: Path) -> Path:
    """Write a pickle (torch.save format) that would create ``marker`` if unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": CodeExecutingPickle(marker)}, path)
    return path


def plant_raw_pickle(path: Path, marker: Path) -> Path:
    """Write a plain ``pickle.dumps`` payload that would create ``marker`` if unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(CodeExecutingPickle(marker)))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> str:
    """Three shards of 48 good records under ``tmp_path/shards``."""
    return write_shards(tmp_path / "shards")


EXPORT_CHUNK = 8
"""Rows per export chunk in the fault tests (48 records -> 6 chunks)."""


def export_arguments(run: Path, shards: str, out: Path, chunk: int = EXPORT_CHUNK) -> list[str]:
    """The ``mmalign export`` command line the export fault tests kill and restart."""
    return [
        "export",
        str(run),
        "--data",
        shards,
        "--out",
        str(out),
        "--chunk-size",
        str(chunk),
        "--dtype",
        "float32",
        "--metadata",
        "cls",
        "--no-progress",
    ]
