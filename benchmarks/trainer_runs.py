"""One training run of open_clip_train or mmalign in a child process, measured.

Shared by ``benchmarks/train_throughput.py``: synthetic image-caption shards, the two
trainers' command lines for the same model and settings (:class:`Model`, :class:`Settings`),
and what one run measured: samples/s over the steps after the warm-up (from the trainer's own
per-interval logs), wall and CPU seconds and peak RSS of the child (``os.wait4``'s
``ru_maxrss``: the largest of the trainer and its DataLoader workers).

Example:
    >>> settings = Settings(batch_size=32, steps=12, warmup_steps=2, log_every=1)
    >>> settings.measured_steps
    10
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
import yaml
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")
CONFIG_ERROR = "mmalign: error:"
"""How mmalign's one-line errors start (a config key this branch does not know, ...)."""

OPEN_CLIP_WRAPPER = """
import sys, open_clip
if sys.argv[1]:
    open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


@dataclass(frozen=True)
class Model:
    """The CLIP both trainers build: an open_clip model name, with its config when it is not
    built in (``model_cfg``: registered with ``open_clip.add_model_config``)."""

    name: str
    embed_dim: int
    model_cfg: dict[str, Any] | None = None
    image_px: int = 40
    """Side of the synthetic shard images (both trainers resize them to the model's)."""

    def mmalign_towers(self) -> dict[str, Any]:
        """mmalign's image and text towers equal to open_clip's model."""
        if self.model_cfg is None:
            return {
                "image": {"type": "image", "model": self.name},
                "text": {"type": "text", "model": self.name},
            }
        image = {"type": "image", "embed_dim": self.embed_dim}
        text = {"type": "text", "embed_dim": self.embed_dim}
        return {
            "image": image | {"vision_cfg": self.model_cfg["vision_cfg"]},
            "text": text | {"text_cfg": self.model_cfg["text_cfg"]},
        }


@dataclass(frozen=True)
class Settings:
    """Training settings both trainers get (AdamW, cosine schedule, fp32, CPU)."""

    batch_size: int
    steps: int
    warmup_steps: int
    """Steps whose logged intervals are left out of samples/s."""
    log_every: int
    workers: int = 1
    threads: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    lr_warmup: int = 5
    grad_clip: float = 1.0

    @property
    def measured_steps(self) -> int:
        return self.steps - self.warmup_steps


class RunFailed(RuntimeError):
    """A run that exited with an error; ``unavailable`` when mmalign refused the config."""

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class Measured:
    """What one run measured."""

    samples_per_s: float | None
    measured_steps: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    step_split_s: dict[str, float | None] = field(default_factory=dict)


def _image(rng: np.random.Generator, colour: str, shape: str, side: int) -> bytes:
    image = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(image)
    x, y, size = (int(v) for v in rng.integers(4, 14, 3))
    box = (x, y, x + 14 + size, y + 14 + size)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
            fill=COLOURS[colour],
        )
    if side != 40:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, samples: int, side: int = 40, shards: int = 4) -> str:
    """Synthetic image-caption shards (``side`` px png + txt); returns their brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = samples // shards
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"train-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                colour = str(rng.choice(list(COLOURS)))
                shape = str(rng.choice(SHAPES))
                writer.write(
                    {
                        "__key__": f"{shard:02d}{index:05d}",
                        "png": _image(rng, colour, shape, side),
                        "txt": f"a {colour} {shape} on a dark background",
                    }
                )
    return str(directory / f"train-{{000000..{shards - 1:06d}}}.tar")


def run_child(
    command: list[str], log: Path, threads: int, pythonpath: str | None = None
) -> tuple[float, float, float]:
    """Run ``command`` (output to ``log``); wall s, CPU s and peak RSS MiB of the child.

    Raises :class:`RunFailed` with the log's last line when it fails.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
        unavailable = child.returncode == 2 and last.startswith(CONFIG_ERROR)
        raise RunFailed(f"exit status {child.returncode}: {last} (log: {log})", unavailable)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _rate(intervals: list[tuple[int, int, float]], settings: Settings) -> tuple[float | None, int]:
    """Samples/s over the logged intervals ``(first step, last step, seconds)`` that start
    after the warm-up; and how many steps they hold."""
    kept = [
        (last - first + 1, seconds)
        for first, last, seconds in intervals
        if first > settings.warmup_steps
    ]
    steps = sum(count for count, _ in kept)
    seconds = sum(duration for _, duration in kept)
    return (steps * settings.batch_size / seconds if seconds else None), steps


def run_open_clip(
    out: Path,
    shards: str,
    model: Model,
    settings: Settings,
    pythonpath: str | None,
    extra: list[str] | None = None,
) -> Measured:
    """Train with open_clip_train (plus ``extra`` arguments); samples/s from its
    per-interval mean batch time."""
    config = ""
    if model.model_cfg is not None:
        config = str(out / f"{model.name}.json")
        Path(config).write_text(json.dumps(model.model_cfg))
    logs = out / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    s = settings
    command = [
        sys.executable, "-c", OPEN_CLIP_WRAPPER, config,
        "--model", model.name, "--train-data", shards, "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(s.steps * s.batch_size),
        "--batch-size", str(s.batch_size), "--epochs", "1", "--workers", str(s.workers),
        "--device", "cpu", "--precision", "fp32", "--lr", str(s.lr), "--wd", str(s.weight_decay),
        "--beta1", str(s.betas[0]), "--beta2", str(s.betas[1]), "--eps", str(s.eps),
        "--warmup", str(s.lr_warmup), "--grad-clip-norm", str(s.grad_clip),
        "--log-every-n-steps", str(s.log_every), "--logs", str(logs),
        "--name", "bench", "--save-frequency", "0", "--seed", "0", "--report-to", "",
        *(extra or []),
    ]  # fmt: skip
    wall, cpu, rss = run_child(command, out / "open_clip.log", s.threads, pythonpath)
    text = (logs / "bench" / "out.log").read_text()
    intervals, last = [], 0
    pattern = r"\[\s*(\d+)/\d+ \(\d+%\)\].*?Batch \(t\): ([0-9.]+)"
    for samples, batch_time in re.findall(pattern, text):
        step = int(samples) // s.batch_size
        intervals.append((last + 1, step, (step - last) * float(batch_time)))
        last = step
    rate, steps = _rate(intervals, s)
    return Measured(rate, steps, wall, cpu, rss)


def mmalign_config(model: Model, settings: Settings, shards: str, output: Path) -> dict[str, Any]:
    """The mmalign config of the run: ``model``'s towers trained with ``settings``."""
    s = settings
    return {
        "model": {
            "dim": model.embed_dim,
            "projection": "none",
            "towers": model.mmalign_towers(),
            "objective": {"name": "clip"},
        },
        "data": {
            "train": shards,
            "fields": {"image": "png", "text": "txt"},
            "label_field": None,
            "batch_size": s.batch_size,
            "workers": s.workers,
            "shuffle_buffer": 1000,
            "resampled": True,
        },
        "train": {
            "steps": s.steps,
            "lr": s.lr,
            "weight_decay": s.weight_decay,
            "betas": list(s.betas),
            "eps": s.eps,
            "warmup": s.lr_warmup,
            "grad_clip": s.grad_clip,
            "output": str(output),
            "log_every": s.log_every,
            "tensorboard": False,
            "plots": False,
        },
    }


def run_mmalign(
    out: Path, shards: str, model: Model, settings: Settings, overrides: list[str]
) -> Measured:
    """Train with ``python -m mmalign train`` (``--set`` each of ``overrides``); samples/s
    and the step-time split from its ``metrics.jsonl``."""
    run_dir = out / "mmalign_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    s = settings
    path = out / "mmalign.yaml"
    path.write_text(yaml.safe_dump(mmalign_config(model, settings, shards, run_dir)))
    command = [sys.executable, "-m", "mmalign", "train", str(path)]
    for override in overrides:
        command += ["--set", override]
    wall, cpu, rss = run_child(command, out / "mmalign.log", s.threads)
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train/loss"' in line
    ]
    intervals, last = [], 0
    for record in records:
        steps = record["step"] - last
        seconds = steps * s.batch_size / record["train/samples_per_s"]
        intervals.append((last + 1, record["step"], seconds))
        last = record["step"]
    rate, steps = _rate(intervals, s)
    kept = [r for r, (first, _, _) in zip(records, intervals) if first > s.warmup_steps]
    split = {}
    for part in ("data", "forward", "loss", "backward", "optimizer"):
        values = [r[f"time/{part}"] for r in kept if f"time/{part}" in r]
        split[part] = float(np.mean(values)) if values else None
    return Measured(rate, steps, wall, cpu, rss, split)
