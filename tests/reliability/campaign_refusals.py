"""The parts of the fault campaign (``run_faults.py``) that are not kills: config faults,
diverging learning rates, settings changed on resume, torn ``metrics.jsonl``.

Each function runs its cases and returns rows ``(fault kind, cases, passed, what passing
means)`` for the tables of ``docs/RELIABILITY.md``. Config faults and diverging runs go
through the command line (``mmalign.cli.main.main`` in this process, stderr captured).

Example:
    >>> sorted(CONFIG_FAULTS)[0]
    'NaN weight'
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import signal
from pathlib import Path

import torch
from conftest import run_mmalign, tiny_config, write_config
from safetensors.torch import load_file
from test_config_faults import CONFIG_FAULTS

from mmalign.cli.main import main
from mmalign.config import ConfigError
from mmalign.training import train

Row = tuple[str, int, int, str]


def cli(arguments: list[str]) -> tuple[int, str]:
    """``mmalign ARGUMENTS`` in this process: exit status and stderr."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = main(arguments)
    return status, errors.getvalue()


def config_faults(root: Path, shards: str) -> list[Row]:
    """Every config fault: exit status 2, one line naming the field, run directory untouched;
    then the fixed config trains with ``--resume``."""
    refused = 0
    for number, (overrides, field) in enumerate(CONFIG_FAULTS.values()):
        run = root / f"config-{number}"
        path = write_config(run.with_suffix(".yaml"), tiny_config(run, shards))
        sets = [part for override in overrides for part in ("--set", override)]
        status, errors = cli(["train", str(path), *sets])
        last = errors.strip().splitlines()[-1] if errors.strip() else ""
        named = f"{field}: " in last and last.startswith("mmalign: error: ")
        refused += status == 2 and named and not run.exists()
    fixed_run = root / "config-fixed"
    path = write_config(fixed_run.with_suffix(".yaml"), tiny_config(fixed_run, shards))
    cli(["train", str(path), "--set", "model.objective={name: anchored, anchor: video}"])
    fixed = cli(["train", str(path), "--resume", "--set", "train.steps=3"])[0] == 0
    return [
        (
            "config fault (15 kinds: anchor, pairs, weights, one modality, logit scale/bias, "
            "epoch_samples, betas, block_size)",
            len(CONFIG_FAULTS),
            refused,
            "exit 2, one line naming the field, run directory untouched",
        ),
        ("the fixed config after a refused one", 1, int(fixed), "trains with --resume"),
    ]


def _all_finite(run: Path) -> bool:
    return all(
        bool(torch.isfinite(tensor).all()) and float(tensor.abs().max()) <= 1e4
        for path in run.rglob("*.safetensors")
        if "optimizer" not in path.name
        for tensor in load_file(path).values()
        if tensor.is_floating_point() and tensor.numel()
    )


def diverging_runs(root: Path, shards: str, repeats: int, seed: int) -> list[Row]:
    """Learning rates that blow the weights up, at seeded warmups (so some runs have saved a
    good checkpoint first): exit status 1, nothing non-finite or beyond the limit saved, and
    the printed advice, followed, finishes a healthy run."""
    rng = random.Random(f"{seed}-diverge")
    cases = stopped = healthy = advised = 0
    for lr in (1e308, 1e30, 1e12):
        for repeat in range(repeats):
            run = root / f"diverge-{lr:g}-{repeat}"
            sections = {"lr": lr, "warmup": rng.randint(0, 4), "save_every": 1, "steps": 8}
            path = write_config(run.with_suffix(".yaml"), tiny_config(run, shards, train=sections))
            status, errors = cli(["train", str(path)])
            cases += 1
            stopped += status == 1 and "diverged" in errors and not (run / "model").exists()
            healthy += _all_finite(run)
            advice = re.search(r"--resume --set (train\.lr=\S+)", errors)
            if advice:
                follow = cli(["train", str(path), "--resume", "--set", advice.group(1)])[0]
                advised += follow == 0 and _all_finite(run)
    return [
        ("diverging learning rate (1e308, 1e30, 1e12)", cases, stopped, "exit 1, no model"),
        ("  ... what it saved", cases, healthy, "every saved tensor finite and <= 1e4"),
        ("  ... its advice followed", cases, advised, "--resume --set train.lr=... finishes"),
    ]


def resume_changes(root: Path, shards: str) -> list[Row]:
    """A new ``train.lr`` on resume is the logged lr; each refused change names its field."""
    run = root / "resume"
    config = tiny_config(run, shards, train={"steps": 4, "save_every": 2, "lr": 0.05})
    train(config)
    train(config, ["train.lr=1e-4", "train.steps=6"], resume=True)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    new_lr = all(r["train/lr"] <= 1e-4 for r in logged if r["step"] > 4)
    refusals = ["data.batch_size=4", "train.seed=3", "model.dim=16", "train.accumulate=2"]
    refused = 0
    for override in refusals:
        try:
            train(config, [override, "train.steps=8"], resume=True)
        except ConfigError as error:
            refused += str(error).startswith(override.split("=")[0] + ": ")
    return [
        ("train.lr changed on --resume", 1, int(new_lr), "the logged lr is the new one"),
        ("other setting changed on --resume", len(refusals), refused, "refused naming it"),
    ]


def torn_metrics(root: Path, shards: str) -> list[Row]:
    """A torn last line of ``metrics.jsonl`` is dropped and reported with the file name; a
    resume SIGKILLed while it rewrites the file (``inject.py``) leaves it whole."""
    run = root / "torn"
    config = tiny_config(run, shards, train={"steps": 6, "save_every": 3})
    train(config)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][:17])
    train(config, ["train.steps=8"], resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    reported = f"{metrics}: the last line (5) was cut off" in (run / "train.log").read_text()
    tolerated = steps == [1, 2, 3, 4, 7, 8] and reported  # resumed at 6: 5 and 6 are lost
    before = metrics.read_text()
    path = write_config(run.with_suffix(".yaml"), config)
    kill = "mmalign.training.logging:atomic_write:1:before"
    killed = run_mmalign(["train", str(path), "--resume", "--set", "train.steps=10"], [kill])
    whole = killed.returncode == -signal.SIGKILL and metrics.read_text() == before
    return [
        ("torn last line of metrics.jsonl", 1, int(tolerated), "resume works, file named"),
        ("SIGKILL while --resume rewrites metrics.jsonl", 1, int(whole), "every line kept"),
    ]
