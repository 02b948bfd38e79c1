"""Training throughput: mmalign vs open_clip's training script on the same tiny CLIP.

The same image-text model (an open_clip ViT: image 32, patch 8, width 64, 2 layers; text
transformer width 64, 2 layers, context 32; embed_dim 64) trains for the same steps on the
same synthetic WebDataset shards (coloured shapes with captions), once with
``python -m open_clip_train.main`` (its model config registered with
``open_clip.add_model_config``) and once with ``python -m mmalign train``, each in its own
process, on the CPU. Reported, for each: samples/s (mean over the logged intervals after the
first; the best of ``--repeats`` interleaved runs) and the marginal CPU time per sample (the
CPU seconds of a ``--steps`` run minus those of a ``--short-steps`` run, over the extra samples:
startup cost cancels, and CPU time is far less disturbed than wall time when other jobs share
the machine); their ratios; and mmalign's time per step split into data / forward / loss /
backward / optimizer.
Both clip gradients at norm 1 and use AdamW with the same learning rate and warmup.

    python benchmarks/train_throughput.py [--steps 60] [--batch-size 64] [--out DIR]
        [--open-clip-pythonpath DIR]   # pandas + webdataset==0.2.86 for open_clip_train
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
import yaml
from PIL import Image, ImageDraw

VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
EMBED_DIM = 64
MODEL_NAME = "bench-tiny-clip"
THREADS = 1
"""Intra-op threads of both trainings: on a shared machine, idle OpenMP threads spin and
both wall and CPU time turn into noise; one thread each keeps the comparison stable."""
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")

OPEN_CLIP_WRAPPER = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def _image(rng: np.random.Generator, colour: str, shape: str) -> bytes:
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
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, samples: int, shards: int = 4) -> str:
    """Synthetic image-caption shards (png + txt); returns their brace pattern."""
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
                        "png": _image(rng, colour, shape),
                        "txt": f"a {colour} {shape} on a dark background",
                    }
                )
    return str(directory / f"train-{{000000..{shards - 1:06d}}}.tar")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log: Path, pythonpath: str | None = None) -> tuple[float, float]:
    """Run ``command``; (wall seconds, CPU seconds of the process and its children)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    start, cpu = time.perf_counter(), _children_cpu_s()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"exit status {done.returncode}: {last[0]} (full log: {log})")
    return time.perf_counter() - start, _children_cpu_s() - cpu


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def run_open_clip(out: Path, shards: str, args: argparse.Namespace, steps: int) -> dict:
    """Train with open_clip_train; samples/s from its per-interval mean batch time."""
    config = out / f"{MODEL_NAME}.json"
    config.write_text(json.dumps({"embed_dim": EMBED_DIM, "vision_cfg": VISION, "text_cfg": TEXT}))
    logs = out / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    command = [
        sys.executable, "-c", OPEN_CLIP_WRAPPER, str(config),
        "--model", MODEL_NAME, "--train-data", shards, "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(steps * args.batch_size),
        "--batch-size", str(args.batch_size), "--epochs", "1", "--workers", str(args.workers),
        "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--wd", "0.1",
        "--warmup", "5", "--grad-clip-norm", "1.0",
        "--log-every-n-steps", str(args.log_every), "--logs", str(logs),
        "--name", "bench", "--save-frequency", "0", "--seed", "0", "--report-to", "",
    ]  # fmt: skip
    wall, cpu = _run(command, out / "open_clip.log", args.open_clip_pythonpath)
    text = (logs / "bench" / "out.log").read_text()
    batch_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    rates = [args.batch_size / t for t in batch_times[1:]]
    return {
        "samples_per_s": _mean_or_none(rates),
        "wall_s": wall,
        "process_cpu_s": cpu,
        "intervals": len(rates),
    }


def run_mmalign(out: Path, shards: str, args: argparse.Namespace, steps: int) -> dict:
    """Train with ``python -m mmalign train``; samples/s and the step-time split from metrics."""
    run_dir = out / "mmalign_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = {
        "model": {
            "dim": EMBED_DIM,
            "projection": "none",
            "towers": {
                "image": {"type": "image", "embed_dim": EMBED_DIM, "vision_cfg": VISION},
                "text": {"type": "text", "embed_dim": EMBED_DIM, "text_cfg": TEXT},
            },
            "objective": {"name": "clip"},
        },
        "data": {
            "train": shards,
            "fields": {"image": "png", "text": "txt"},
            "label_field": None,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "shuffle_buffer": 1000,
            "resampled": True,
        },
        "train": {
            "steps": steps,
            "lr": 1e-3,
            "weight_decay": 0.1,
            "warmup": 5,
            "grad_clip": 1.0,
            "output": str(run_dir),
            "log_every": args.log_every,
            "tensorboard": False,
            "plots": False,
        },
    }
    path = out / "mmalign.yaml"
    path.write_text(yaml.safe_dump(config))
    wall, cpu = _run([sys.executable, "-m", "mmalign", "train", str(path)], out / "mmalign.log")
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train/loss"' in line
    ][1:]
    split = {
        part: _mean_or_none([r[f"time/{part}"] for r in records if f"time/{part}" in r])
        for part in ("data", "forward", "loss", "backward", "optimizer")
    }
    return {
        "samples_per_s": _mean_or_none([r["train/samples_per_s"] for r in records]),
        "wall_s": wall,
        "process_cpu_s": cpu,
        "intervals": len(records),
        "step_split_s": split,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--short-steps", type=int, default=10, help="a shorter run whose CPU time is subtracted"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best kept")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmalign_train_throughput"))
    parser.add_argument(
        "--open-clip-pythonpath",
        help="extra PYTHONPATH for open_clip_train only: it imports pandas and needs "
        "webdataset<=0.2.86 (its `training` extra); mmalign uses webdataset 1.x. Make one with "
        "pip install --target DIR pandas 'webdataset==0.2.86' --no-deps (+ pandas' deps)",
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    shards = write_shards(args.out / "data", samples=2048)
    results: dict = {"settings": vars(args) | {"out": str(args.out)}, "runs": []}
    tools = {"open_clip": run_open_clip, "mmalign": run_mmalign}
    for _ in range(args.repeats):  # interleaved, so both see similar machine load
        run: dict = {}
        for name, tool in tools.items():
            try:
                short = tool(args.out, shards, args, args.short_steps)
                long = tool(args.out, shards, args, args.steps)
            except RuntimeError as error:
                run[name] = {"error": str(error)}
                continue
            extra = (args.steps - args.short_steps) * args.batch_size
            long["cpu_ms_per_sample"] = (
                1000 * (long["process_cpu_s"] - short["process_cpu_s"]) / extra
            )
            run[name] = long
        results["runs"].append(run)
    summary = {}
    for name in tools:
        done = [run[name] for run in results["runs"] if "error" not in run[name]]
        if done:
            summary[name] = {
                "best_samples_per_s": max(r["samples_per_s"] for r in done),
                "median_cpu_ms_per_sample": float(
                    np.median([r["cpu_ms_per_sample"] for r in done])
                ),
            }
    results["summary"] = summary
    if len(summary) == 2:
        results["ratio_samples_per_s"] = (
            summary["mmalign"]["best_samples_per_s"] / summary["open_clip"]["best_samples_per_s"]
        )
        results["ratio_cpu_per_sample"] = (
            summary["mmalign"]["median_cpu_ms_per_sample"]
            / summary["open_clip"]["median_cpu_ms_per_sample"]
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
