"""Peak RSS of demo-digits training at global batches of 1k, 4k and 16k: exact accumulation
(GradCache-style, fixed micro-batch) plus the tiled loss keep memory flat in the batch.

Each global batch trains ``--steps`` optimizer steps of ``mmalign/demo/configs/demo_digits.yaml``
in its own process (peak RSS is per process; ``--workers 0`` keeps the data loading in it)
with ``data.batch_size`` = the micro-batch and ``train.accumulate`` = global / micro, and the
objective ``--objective`` (default: ``clip`` on the image-text pair with ``tile: auto``, no
Matryoshka prefixes, so that the K + 1 loss evaluations of a 16k step fit a few minutes on 2
cores). Prints a markdown table: global batch, accumulation, seconds per step, peak RSS and
its ratio to the smallest batch's.

Usage (data from ``mmalign prep make-demo --out data/demo``):
    python benchmarks/tiled_training.py --data data/demo
    python benchmarks/tiled_training.py --data data/demo --batches 1024 4096 --micro 512
    python benchmarks/tiled_training.py --data data/demo --spill false   # inputs kept in memory
    python benchmarks/tiled_training.py --data data/demo --host-memory keep   # heap kept

The allocator is the trainer's (``train.host_memory: auto`` releases memory from the first
step that spills; see mmalign/training/host_memory.py): no environment variable is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIG = "mmalign/demo/configs/demo_digits.yaml"
OBJECTIVE = "{name: clip, tile: auto, pairs: [[image, text]]}"


def _overrides(args: argparse.Namespace, batch: int, output: str) -> list[str]:
    digits = f"{args.data}/digits"
    return [
        f"data.train={digits}/train-{{000000..000007}}.tar",
        f"data.val={digits}/val-000000.tar",
        f"data.test={digits}/test-000000.tar",
        f"data.classes={digits}/classes.json",
        f"data.batch_size={min(batch, args.micro)}",
        f"data.workers={args.workers}",
        f"train.accumulate={max(1, batch // args.micro)}",
        f"train.steps={args.steps}",
        "train.warmup=0",
        "train.log_every=1",
        f"train.output={output}",
        "eval.every=0",
        "eval.max_samples=64",
        "model.matryoshka=null",
        f"model.objective={args.objective}",
        f"train.spill_inputs={args.spill}",
        f"train.host_memory={args.host_memory}",
    ]


def run_batch(args: argparse.Namespace, batch: int) -> dict:
    """Train in this process; seconds per step and peak RSS."""
    import torch

    from mmalign.training import train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        train(CONFIG, overrides=_overrides(args, batch, f"{output}/run"))
        seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds_per_step": seconds, "peak_mib": peak, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/demo", help="mmalign prep make-demo's --out")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--micro", type=int, default=1024, help="micro-batch (data.batch_size)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per batch")
    parser.add_argument("--workers", type=int, default=0, help="data.workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--objective", default=OBJECTIVE, help="model.objective (YAML)")
    parser.add_argument(
        "--spill", default="auto", choices=["auto", "true", "false"], help="train.spill_inputs"
    )
    parser.add_argument(
        "--host-memory",
        default="auto",
        choices=["auto", "keep", "release"],
        help="train.host_memory",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_batch(args, args.worker)))
        return
    print(
        f"load average before: {os.getloadavg()}; objective {args.objective}; "
        f"spill_inputs {args.spill}; host_memory {args.host_memory}\n"
    )
    print(
        "| global batch | micro x accumulate | train() s per step (with set-up) "
        "| peak RSS MiB | vs first | load |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    first = None
    for batch in args.batches:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(batch)]
        run = subprocess.run(command, check=True, capture_output=True, text=True)
        output = run.stdout
        result = json.loads(output.strip().splitlines()[-1])
        first = first or result["peak_mib"]
        accumulate = max(1, batch // args.micro)
        print(
            f"| {batch:,} | {min(batch, args.micro)} x {accumulate} | "
            f"{result['seconds_per_step']:.1f} | {result['peak_mib']:.0f} | "
            f"{result['peak_mib'] / first:.2f} | {result['load']:.1f} |",
            flush=True,
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
