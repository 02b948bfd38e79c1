"""FSDP vs DDP with two CPU processes (gloo) on the same model: peak RSS per process and
samples/s.

Both runs train the same image-text model on the same synthetic shards
(``train_throughput.write_shards``: coloured shapes with captions) with
``torchrun --nproc_per_node 2 -m mmalign train``, once with ``train.strategy: ddp`` and once
with ``fsdp``, interleaved ``--repeats`` times. The default model is open_clip's ViT-B-32 image
tower and its text transformer (151M parameters, as ``configs/clip_vit_b32.yaml``) at a
reduced input size (``--image-size`` 64, ``--context-length`` 16) so a step fits a few
seconds on a busy CPU: parameter, gradient and AdamW memory (what FSDP shards) are those of
the full model, activations are small. Reported per strategy: the peak RSS of each of the two
processes (``ru_maxrss``, written by each rank when it exits), samples/s (mean over the
logged intervals after the first, the best of the repeats), and the FSDP / DDP ratios. Peak
RSS is reported after setup (model built, sharded under FSDP, optimizer made: noted at the
first step), over the training steps (noted when the final checkpoint save begins) and over
the whole run (which adds the checkpoint save and, under FSDP, the consolidation of the final
model on rank 0).

    python benchmarks/fsdp.py [--steps 6] [--batch-size 4] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from train_throughput import write_shards

STRATEGIES = ("ddp", "fsdp")


def _model(args: argparse.Namespace) -> dict:
    """open_clip ViT-B-32 towers (random init) at the benchmark's input size."""
    return {
        "dim": 512,
        "projection": "none",
        "towers": {
            "image": {"type": "image", "model": args.model, "image_size": args.image_size},
            "text": {"type": "text", "model": args.model, "context_length": args.context_length},
        },
        "objective": {"name": "clip"},
    }


def _config(out: Path, shards: str, strategy: str, args: argparse.Namespace) -> Path:
    config = {
        "model": _model(args),
        "data": {
            "train": shards,
            "fields": {"image": "png", "text": "txt"},
            "label_field": None,
            "batch_size": args.batch_size,
            "workers": 0,
            "shuffle_buffer": 0,
            "resampled": True,
        },
        "train": {
            "steps": args.steps,
            "lr": 1e-4,
            "warmup": 0,
            "grad_clip": 1.0,
            "strategy": strategy,
            "output": str(out / f"run-{strategy}"),
            "log_every": 1,
            "tensorboard": False,
            "plots": False,
        },
    }
    path = out / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(rss_dir: str, arguments: list[str]) -> None:
    """One launched rank: ``mmalign`` with ``arguments``, then its peak RSS to a file: over
    the training steps (when the first checkpoint save starts) and over the whole run."""
    from mmalign.training import checkpoint, trainer

    save, step, peaks = checkpoint.save_checkpoint, trainer.accumulated_step, {}

    def step_after_noting_the_peak(*args: object, **kwargs: object) -> object:
        peaks.setdefault("setup_kib", _peak_kib())
        return step(*args, **kwargs)

    def save_after_noting_the_peak(*args: object, **kwargs: object) -> Path:
        peaks.setdefault("training_kib", _peak_kib())
        return save(*args, **kwargs)

    trainer.accumulated_step = step_after_noting_the_peak
    checkpoint.save_checkpoint = save_after_noting_the_peak
    sys.argv = ["mmalign", *arguments]
    try:
        runpy.run_module("mmalign", run_name="__main__", alter_sys=True)
    finally:
        peaks["run_kib"] = _peak_kib()
        rank = os.environ.get("RANK", "0")
        Path(rss_dir, f"rank{rank}.json").write_text(json.dumps(peaks))


def run(out: Path, shards: str, strategy: str, args: argparse.Namespace) -> dict:
    """One 2-process training run; peak RSS per rank (MiB) and samples/s."""
    config = _config(out, shards, strategy, args)
    run_dir, rss_dir = out / f"run-{strategy}", out / f"rss-{strategy}"
    for directory in (run_dir, rss_dir):
        shutil.rmtree(directory, ignore_errors=True)
    rss_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(args.port),
        __file__, "--worker", str(rss_dir), "--", "train", str(config),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with (out / f"{strategy}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy}: exit status {done.returncode} (log: {out}/{strategy}.log)")
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train/loss"' in line
    ][1:]
    peaks = [json.loads((rss_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    info = json.loads((run_dir / "run.json").read_text())
    return {
        "strategy": info["strategy"],
        "world_size": info["world_size"],
        "setup_peak_rss_mib": [peak["setup_kib"] / 1024 for peak in peaks],
        "training_peak_rss_mib": [peak["training_kib"] / 1024 for peak in peaks],
        "run_peak_rss_mib": [peak["run_kib"] / 1024 for peak in peaks],
        "samples_per_s": float(np.mean([r["train/samples_per_s"] for r in records])),
        "wall_s": time.perf_counter() - start,
    }


def table(results: dict[str, dict]) -> str:
    """The comparison table (Markdown): DDP, FSDP and FSDP / DDP."""
    ddp, fsdp = results["ddp"], results["fsdp"]
    rows = [
        (f"peak RSS {when}, rank {rank} (MiB)", ddp[key][rank], fsdp[key][rank])
        for when, key in (
            ("after setup", "setup_peak_rss_mib"),
            ("training", "training_peak_rss_mib"),
            ("whole run", "run_peak_rss_mib"),
        )
        for rank in (0, 1)
    ]
    rows.append(("samples/s (2 processes)", ddp["samples_per_s"], fsdp["samples_per_s"]))
    lines = ["| | DDP | FSDP | FSDP / DDP |", "|---|---:|---:|---:|"]
    for name, left, right in rows:
        lines.append(f"| {name} | {left:.4g} | {right:.4g} | {right / left:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model of both towers")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved DDP/FSDP pairs")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fsdp"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(args.out / "shards", samples=256)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for strategy in STRATEGIES:
            result = run(args.out, shards, strategy, args)
            print(json.dumps(result), flush=True)
            if strategy not in best or result["samples_per_s"] > best[strategy]["samples_per_s"]:
                best[strategy] = result
    print(table(best))
    (args.out / "fsdp.json").write_text(json.dumps(best, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
