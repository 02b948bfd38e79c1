"""Benchmark mmalign's objectives against the references, one subprocess per configuration.

* Symile ``n2``: the ``symile`` package's ``Symile("n_squared")`` (float32) vs mmalign's
  blockwise ``symile`` (``negatives: n2``, ``block_precision`` fp32 and bf16) on the same
  inputs (M = 3, d = 256, B = 128/256/512; M = 4, B = 64), plus mmalign alone at B = 2048
  (the reference would need about 35 GiB of logits).
* CLIP: open_clip's ``ClipLoss`` vs mmalign's ``clip`` at B = 1024 and 4096, d = 512.

Each row reports the median wall-clock and CPU time (all threads) of one forward + backward
pass after one untimed warm-up pass (none with ``--quick`` or at B = 2048), and the peak
resident memory of its process (and the peak minus the RSS just before the first pass). The
warm-up keeps one-time costs (thread pools, first touch of fresh memory, library set-up)
out of single-pass timings, one reason why a lone pass in a fresh process and the same pass
timed among others in one long-running process differ. A process per configuration is kept
for the memory figures: peak RSS is per process.

A second table, the roofline, puts each mmalign Symile time next to what the machine can do,
measured in the same process after the timed passes (median of 3): a bare matmul pass (the
``B^M * d`` multiply-adds as ``(B x d) @ (d x block)`` matmuls in the block precision) and an
exponential pass (``exp`` over ``B^M`` entries). The floor is four matmul passes (forward,
recompute, two gradient matmuls) plus two exponential passes (one each way); share = floor /
mmalign time (wall clock; then the floor, mmalign and the share in CPU seconds of this
process, steadier on a loaded machine with one thread, and the ``symile`` package's CPU
seconds, so that ``--only-symile --cases 3x512 --threads 1`` prints every figure of the
target in one table). mmalign runs its CPU matmuls in tiles smaller than a block
(:data:`mmalign.objectives.symile_n2_blocks.TILE_FLOATS`), which can be faster than the
block-sized matmuls of the floor, so the last share is against a floor of tile-sized
matmul passes (same work, mmalign's tile width) as well. ``--errors`` prints instead the error of
bf16 blocks against fp32 ones; ``--digits-sum`` trains the demo's digits-sum Symile config
with ``n2`` negatives in each block precision and prints the final loss and the zero-shot
accuracy of ``mmalign demo``. Every table is preceded and followed by ``os.getloadavg()``.

Usage:
    python benchmarks/objectives.py            # full run (many minutes on 2 cores)
    python benchmarks/objectives.py --quick    # one timed pass per configuration, no B = 2048
    python benchmarks/objectives.py --threads 1  # robust on a machine shared with other jobs
    python benchmarks/objectives.py --only-symile --cases 3x512  # the B = 512 rows only
    python benchmarks/objectives.py --errors   # bf16 vs fp32 error table (B = 128, 512)
    python benchmarks/objectives.py --digits-sum data/demo/digits-sum \
        --towers runs/demo/digits/open_clip   # training, fp32 vs bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYMILE_CASES = [(3, 128), (3, 256), (3, 512), (4, 64)]
CLIP_BATCHES = [1024, 4096]
LARGE_BATCH = 2048
BLOCK_SIZE = 16384
ERROR_BATCHES, ERROR_SCALES, ERROR_SEEDS = [128, 512], [10.0, 100.0], 5


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _load() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _inputs(count: int, rows: int, dim: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
        .detach()
        .requires_grad_()
        for _ in range(count)
    ]


def _loss_function(case: dict, scale_value: float = 10.0):
    import torch

    scale = torch.tensor(scale_value, requires_grad=True)
    if case["objective"] == "symile":
        if case["impl"] == "reference":
            from symile import Symile

            reference = Symile("n_squared")
            return lambda tensors: reference(tensors, scale)
        from mmalign.objectives import build_objective

        precision = case.get("precision", "fp32")
        objective = build_objective(
            {"name": "symile", "negatives": "n2", "block_precision": precision}
        )
    else:
        if case["impl"] == "reference":
            from open_clip.loss import ClipLoss

            reference = ClipLoss()
            return lambda tensors: reference(tensors[0], tensors[1], scale)
        from mmalign.objectives import build_objective

        objective = build_objective({"name": "clip"})
    return lambda tensors: objective({str(i): t for i, t in enumerate(tensors)}, scale).loss


def _roofline_passes(case: dict):
    """(matmul pass, tile matmul pass, exponential pass): each times the whole ``B^M`` work,
    the matmuls in blocks of the size mmalign uses and in mmalign's CPU tiles, in the case's
    block precision."""
    import torch

    from mmalign.objectives.symile_n2_blocks import TILE_FLOATS

    rows, dim = case["batch"], case["dim"]
    prefixes_per_block = max(1, BLOCK_SIZE // rows)
    candidates = prefixes_per_block * rows
    blocks = math.ceil(rows ** (case["modalities"] - 2) / prefixes_per_block)
    dtype = torch.bfloat16 if case.get("precision") == "bf16" else torch.float32
    anchor = torch.randn(rows, dim).to(dtype)
    products = torch.randn(candidates, dim).to(dtype)
    logits = torch.empty(rows, candidates, dtype=dtype)
    source = torch.rand(rows, candidates).neg_()
    exps = torch.empty_like(source)
    width = min(candidates, max(1, TILE_FLOATS // rows))
    tile = torch.empty(rows, width, dtype=dtype)
    tiles = products.split(width)

    def matmul_pass() -> None:
        for _ in range(blocks):
            torch.mm(anchor, products.T, out=logits)

    def tile_matmul_pass() -> None:
        for _ in range(blocks):
            for part in tiles:
                torch.mm(anchor, part.T, out=tile[:, : part.shape[0]])

    def exp_pass() -> None:
        for _ in range(blocks):
            torch.exp(source, out=exps)

    return matmul_pass, tile_matmul_pass, exp_pass


def _timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu_start = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_case(case: dict) -> dict:
    """Time forward + backward of one configuration in this process."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    tensors = _inputs(case["modalities"], case["batch"], case["dim"])
    loss_of = _loss_function(case)
    baseline = _current_rss_mib()
    for _ in range(case.get("warmup", 0)):
        loss_of(tensors).backward()
        for tensor in tensors:
            tensor.grad = None
    times, cpu_times = [], []
    for _ in range(case["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of(tensors)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        for tensor in tensors:
            tensor.grad = None
    result = {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_mib": _peak_rss_mib(),
        "extra_mib": _peak_rss_mib() - baseline,
        "loss": float(loss.detach()),
    }
    if case["objective"] == "symile" and case["impl"] == "mmalign":
        # after the peak RSS is taken: the passes' buffers would count in it
        matmul_pass, tile_matmul_pass, exp_pass = _roofline_passes(case)
        matmul_pass()
        repeats = max(3, case["repeats"])
        passes = (
            ("matmul_pass", matmul_pass),
            ("tile_matmul_pass", tile_matmul_pass),
            ("exp_pass", exp_pass),
        )
        for name, function in passes:
            walls, cpus = zip(*(_timed(function) for _ in range(repeats)))
            result[name], result[f"{name}_cpu"] = statistics.median(walls), statistics.median(cpus)
    return result


def _spawn(case: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _symile_rows(args: argparse.Namespace) -> list[tuple[str, list[dict], dict | None]]:
    """(label, mmalign cases (fp32, then bf16), reference case or None)."""
    cases = SYMILE_CASES + ([] if args.quick and not args.cases else [(3, LARGE_BATCH)])
    rows = []
    for modalities, batch in cases:
        if args.cases and f"{modalities}x{batch}" not in args.cases:
            continue
        base = {"objective": "symile", "modalities": modalities, "batch": batch, "dim": 256}
        base.update(threads=args.threads, repeats=1 if args.quick or batch >= 512 else 3)
        base["warmup"] = 0 if args.quick or batch == LARGE_BATCH else 1
        precisions = ["fp32"] if batch == LARGE_BATCH else args.precisions
        ours = [{**base, "impl": "mmalign", "precision": p} for p in precisions]
        reference = None if batch == LARGE_BATCH else {**base, "impl": "reference"}
        rows.append((f"symile n2, M={modalities}, B={batch}, d=256", ours, reference))
    return rows


def _clip_rows(args: argparse.Namespace) -> list[tuple[str, list[dict], dict]]:
    rows = []
    for batch in CLIP_BATCHES:
        base = {"objective": "clip", "modalities": 2, "batch": batch, "dim": 512}
        base.update(threads=args.threads, repeats=3 if args.quick else 10, warmup=1)
        rows.append(
            (
                f"clip, M=2, B={batch}, d=512",
                [{**base, "impl": "mmalign"}],
                {**base, "impl": "reference"},
            )
        )
    return rows


def _times(result: dict) -> str:
    return f"{result['seconds']:.3f} ({result['cpu_seconds']:.3f})"


def _memory(result: dict) -> str:
    return f"{result['peak_mib']:.0f} (+{result['extra_mib']:.0f})"


def _roofline_line(label: str, case: dict, ours: dict, reference: dict | None) -> str:
    """One roofline row: the floor and mmalign's time, wall and CPU seconds, and the
    ``symile`` package's CPU seconds beside them (so one command prints every figure)."""
    floor = 4 * ours["matmul_pass"] + 2 * ours["exp_pass"]
    cpu_floor = 4 * ours["matmul_pass_cpu"] + 2 * ours["exp_pass_cpu"]
    tile_floor = 4 * ours["tile_matmul_pass_cpu"] + 2 * ours["exp_pass_cpu"]
    package = "-"
    if reference is not None:
        speed_up = reference["cpu_seconds"] / ours["cpu_seconds"]
        package = f"{reference['cpu_seconds']:.3f} ({speed_up:.2f}x)"
    return (
        f"| {label} | {case['precision']} | {ours['matmul_pass']:.3f} | {ours['exp_pass']:.3f} "
        f"| {floor:.3f} | {ours['seconds']:.3f} | {ours['seconds'] / ours['matmul_pass']:.2f} "
        f"| **{floor / ours['seconds']:.0%}** | {cpu_floor:.3f} | {ours['cpu_seconds']:.3f} "
        f"| **{cpu_floor / ours['cpu_seconds']:.0%}** | {ours['tile_matmul_pass_cpu']:.3f} "
        f"| {tile_floor / ours['cpu_seconds']:.0%} | {package} |"
    )


def compare(args: argparse.Namespace) -> None:
    print(_load(), flush=True)
    print()
    print(
        "| configuration | block precision | reference s (CPU s) | mmalign s (CPU s) | "
        "speed-up wall (CPU) | reference peak RSS MiB (+run) | mmalign peak RSS MiB (+run) | "
        "memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    roofline = []
    rows = _symile_rows(args) + ([] if args.only_symile else _clip_rows(args))
    for label, our_cases, reference_case in rows:
        reference = _spawn(reference_case) if reference_case else None
        for case in our_cases:
            ours = _spawn(case)
            precision = case.get("precision", "fp32")
            if "matmul_pass" in ours:
                roofline.append(_roofline_line(label, case, ours, reference))
            if reference is None:
                print(
                    f"| {label} | {precision} | not run: its logits alone need "
                    f"{LARGE_BATCH**3 * 4 / 2**30:.0f} GiB | {_times(ours)} | - | - | "
                    f"{_memory(ours)} | - |",
                    flush=True,
                )
                continue
            print(
                f"| {label} | {precision} | {_times(reference)} | {_times(ours)} | "
                f"{reference['seconds'] / ours['seconds']:.2f}x "
                f"({reference['cpu_seconds'] / ours['cpu_seconds']:.2f}x) | "
                f"{_memory(reference)} | {_memory(ours)} | "
                f"{ours['peak_mib'] / reference['peak_mib']:.3f} |",
                flush=True,
            )
    print()
    print(
        "| configuration | block precision | matmul pass s | exp pass s | "
        "floor s (4 matmul + 2 exp passes) | mmalign s | mmalign in matmul passes | "
        "share of floor | floor CPU s | mmalign CPU s | share of floor in CPU s | "
        "tile matmul pass CPU s | share of the tile-matmul floor in CPU s | "
        "symile package CPU s (mmalign's speed-up) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(roofline))
    print()
    print(_load(), flush=True)


def _relative_errors(batch: int, scale: float, seed: int, threads: int | None):
    """(loss error, gradient error) of bf16 blocks against fp32 ones on the same inputs: the
    gradient error is the largest over the inputs of ``|g_bf16 - g_fp32| / |g_fp32|``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    tensors = _inputs(3, batch, 256, seed=seed)
    results = {}
    for precision in ("fp32", "bf16"):
        case = {"objective": "symile", "impl": "mmalign", "precision": precision}
        loss = _loss_function(case, scale)(tensors)
        results[precision] = (loss.detach(), torch.autograd.grad(loss, tensors))
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    loss_error = float((loss16 - loss32).abs() / loss32.abs())
    grad_error = max(float((a - b).norm() / b.norm()) for a, b in zip(grads16, grads32))
    return loss_error, grad_error


def errors(args: argparse.Namespace) -> None:
    print(_load(), flush=True)
    print()
    print(f"bf16 vs fp32 blocks, M = 3, d = 256, {args.error_seeds} seeds (median and max):")
    print()
    print(
        "| B | logit scale | loss rel. error median | loss rel. error max | "
        "gradient rel. error median | gradient rel. error max |"
    )
    print("|---|---|---|---|---|---|")
    for batch in args.error_batches:
        for scale in ERROR_SCALES:
            pairs = [
                _relative_errors(batch, scale, s, args.threads) for s in range(args.error_seeds)
            ]
            loss, grad = zip(*pairs)
            print(
                f"| {batch} | {scale:g} | {statistics.median(loss):.1e} | {max(loss):.1e} "
                f"| {statistics.median(grad):.1e} | {max(grad):.1e} |",
                flush=True,
            )
    print()
    print(_load(), flush=True)


def _train_digits_sum(args: argparse.Namespace, precision: str, out: Path) -> str:
    """Train the demo's digits-sum Symile config with ``n2`` negatives; one table row."""
    import torch

    from mmalign.config import load_config
    from mmalign.demo.pipeline import default_configs_dir, run_config
    from mmalign.demo.results import sum_zeroshot
    from mmalign.demo.runs import Run
    from mmalign.model import AlignmentModel
    from mmalign.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "digits-sum-symile"
    config = run_config(name, default_configs_dir(), args.digits_sum, out, quick=False)
    for tower in config["model"]["towers"].values():
        if tower.get("pretrained"):
            tower["pretrained"] = f"local-dir:{args.towers}"
    config["model"]["objective"].update(negatives="n2", block_precision=precision)
    config["train"].update(steps=args.steps, output=str(out / precision))
    cpu_start = time.process_time()
    result = train(config, resume=False)
    cpu_seconds = time.process_time() - cpu_start
    model = AlignmentModel.from_pretrained(result.model_dir).eval()
    run = Run(name, out / precision, "", load_config(config), result.steps, None, model)
    top1 = sum_zeroshot(run)["metrics"]["top1"]
    return (
        f"| {precision} | {result.steps} | {result.final_loss:.4f} | {top1:.1%} | "
        f"{cpu_seconds:.0f} |"
    )


def digits_sum(args: argparse.Namespace) -> None:
    print(_load(), flush=True)
    print()
    print("| block precision | steps | final loss | zero-shot top-1 | train CPU s (main process) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for precision in args.precisions:
            print(_train_digits_sum(args, precision, Path(out)), flush=True)
    print()
    print(_load(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pass per case, skip B=2048")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    parser.add_argument("--only-symile", action="store_true", help="skip the CLIP rows")
    parser.add_argument("--cases", nargs="+", help="Symile cases as MxB, e.g. 3x512 4x64")
    parser.add_argument("--errors", action="store_true", help="bf16 vs fp32 error table")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="block precisions of the mmalign Symile rows",
    )
    parser.add_argument(
        "--error-batches", type=int, nargs="+", default=ERROR_BATCHES, help="B of --errors"
    )
    parser.add_argument("--error-seeds", type=int, default=ERROR_SEEDS, help="seeds of --errors")
    parser.add_argument(
        "--digits-sum", type=Path, help="train digits-sum (this dataset dir) with each precision"
    )
    parser.add_argument(
        "--towers", type=Path, help="--digits-sum: the demo digits model's open_clip folder"
    )
    parser.add_argument("--steps", type=int, default=100, help="--digits-sum: training steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
    elif args.errors:
        errors(args)
    elif args.digits_sum:
        digits_sum(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
