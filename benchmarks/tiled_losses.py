"""Memory and speed of the tiled losses (``model.objective.tile``) at large batches.

For ``clip`` and ``sigmoid`` at B = 1k, 4k, 16k, 65k (d = 512, float32, forward + backward):
mmalign tiled (``tile: 2048``, what ``tile: auto`` picks from B = 2048 on), mmalign dense
(``tile: none``) and open_clip's ``ClipLoss``/``SigLipLoss``; ``--losses symile_n``: Symile
with ``negatives: n`` on M = 3 modalities, against the ``symile`` package's ``Symile("n")``.
Each row runs in its own subprocess
(peak RSS is per process) under an address-space limit. Dense rows whose logits would not
fit the memory budget are skipped (the table says so). Each worker also times a bare matmul
pass in the same process, right after the loss: ``B^2 d`` multiply-adds as
``(tile x d) @ (d x tile)`` matmuls (a sample of them, scaled to ``B^2``), the unit of the
"passes" column. The floor is 6 passes for ``clip`` (``2 B^2 d`` forward, the two directions'
logits, and twice that backward), 3 for ``sigmoid`` and 9 for ``symile_n`` (one ``B x B``
logit matrix per anchor, three anchors, and twice that backward); ratio = time / floor, in wall
clock and (in brackets) in CPU seconds of the worker, steadier when the load changes.

The largest batch within the budget is fitted from the measured peaks (linear in B for the
tiled loss, quadratic for the dense ones) over the two largest batches measured.

Usage:
    python benchmarks/tiled_losses.py                 # every row, 65k last (about 25 min)
    python benchmarks/tiled_losses.py --batches 1024 4096 --losses clip   # quick
    python benchmarks/tiled_losses.py --batches 4096 16384 --losses symile_n
    python benchmarks/tiled_losses.py --threads 2     # default 1: steady on a shared machine
    python benchmarks/tiled_losses.py --interleave 4096   # speed: auto vs ClipLoss, one process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCHES = [1024, 4096, 16384, 65536]
DIM, TILE = 512, 2048
FLOOR_PASSES = {"clip": 6, "sigmoid": 3, "symile_n": 9}
REFERENCE = {"clip": "open_clip", "sigmoid": "open_clip", "symile_n": "symile"}
"""Per loss, the method name of the reference implementation."""
MODALITIES = {"clip": 2, "sigmoid": 2, "symile_n": 3}
DENSE_MATRICES = 10
"""Dense rows are skipped when ``DENSE_MATRICES`` float32 ``B x B`` matrices (the logits of
both directions, their softmax and gradients, as measured at B = 4096) exceed the budget."""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loss_function(loss: str, method: str):
    """``f(embeddings, scale, bias) -> loss`` for one loss and method."""
    import torch

    if method == "symile":
        from symile import Symile

        package = Symile("n")
        return lambda embeddings, scale, bias: package(embeddings, scale)
    if method == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        reference = ClipLoss() if loss == "clip" else SigLipLoss()
        if loss == "clip":
            return lambda embeddings, scale, bias: reference(*embeddings, scale)
        return lambda embeddings, scale, bias: reference(*embeddings, scale, bias)
    from mmalign.objectives import build_objective

    config = {"name": "symile", "negatives": "n"} if loss == "symile_n" else {"name": loss}
    objective = build_objective({**config, "tile": TILE if method == "tiled" else "none"})
    with_bias = loss == "sigmoid"

    def ours(embeddings: list[torch.Tensor], scale: torch.Tensor, bias: torch.Tensor):
        named = {f"m{index}": embedding for index, embedding in enumerate(embeddings)}
        return objective(named, scale, bias if with_bias else None).loss

    return ours


def _matmul_pass_seconds(batch: int, dim: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``batch^2 dim`` multiply-adds in ``TILE``-sized matmuls (a
    timed sample of at least 8 matmuls and 1 s, scaled)."""
    import torch

    left, right = torch.randn(TILE, dim), torch.randn(dim, TILE)
    out = torch.empty(TILE, TILE)
    torch.mm(left, right, out=out)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while count < 8 or time.perf_counter() - start < 1.0:
        torch.mm(left, right, out=out)
        count += 1
    scale = (batch / TILE) ** 2 / count
    return (time.perf_counter() - start) * scale, (time.process_time() - cpu_start) * scale


def run_case(case: dict) -> dict:
    """One configuration in this process: time, peak RSS, the bare matmul pass."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    batch = case["batch"]
    embeddings = [
        F.normalize(torch.randn(batch, DIM), dim=-1).requires_grad_()
        for _ in range(MODALITIES[case["loss"]])
    ]
    scale = torch.tensor(10.0 if case["loss"] == "sigmoid" else 20.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss_of = _loss_function(case["loss"], case["method"])
    repeats = 3 if batch <= 4096 else 1
    if batch <= 4096:  # warm-up: thread pools and first touch out of the timing
        loss_of(embeddings, scale, bias).backward()
    times, cpu_times = [], []
    for _ in range(repeats):
        for tensor in (*embeddings, scale, bias):
            tensor.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_of(embeddings, scale, bias).backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = _peak_rss_mib()
    matmul_pass, matmul_pass_cpu = _matmul_pass_seconds(batch, DIM)
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_mib": peak,
        "matmul_pass": matmul_pass,
        "matmul_pass_cpu": matmul_pass_cpu,
        "load": os.getloadavg()[0],
    }


def interleaved(batch: int, repeats: int, threads: int) -> None:
    """``tile: auto`` vs open_clip's ``ClipLoss`` in one process, passes alternated (the
    speed comparison; the table's rows are separate processes, for the memory)."""
    import torch

    torch.set_num_threads(threads)
    case = {"loss": "clip", "batch": batch}
    a, b = (
        torch.nn.functional.normalize(torch.randn(batch, DIM), dim=-1).requires_grad_()
        for _ in range(2)
    )
    scale, bias = torch.tensor(20.0, requires_grad=True), torch.tensor(0.0)
    from mmalign.objectives import build_objective

    auto = build_objective({"name": "clip", "tile": "auto"})
    functions = {
        "tile: auto": lambda: auto({"a": a, "b": b}, scale).loss,
        "open_clip ClipLoss": _loss_function(case["loss"], "open_clip"),
    }
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats + 1):  # the first round warms up
        for name, function in functions.items():
            start = time.perf_counter()
            loss = function() if name == "tile: auto" else function([a, b], scale, bias)
            loss.backward()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    ours, theirs = medians["tile: auto"], medians["open_clip ClipLoss"]
    print(f"B = {batch:,}, d = {DIM}, {repeats} interleaved passes each, {_load_line()}")
    print(f"tile: auto {ours:.3f} s, open_clip ClipLoss {theirs:.3f} s: {theirs / ours:.2f}x")


def _load_line() -> str:
    return "load " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _spawn(case: dict, limit_gib: float) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(case),
        "--limit-gib",
        str(limit_gib),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _dense_fits(batch: int, budget_mib: float) -> bool:
    return DENSE_MATRICES * batch * batch * 4 / 2**20 <= budget_mib


def _largest_batch(points: list[tuple[int, float]], power: int, budget_mib: float) -> str:
    """The batch where ``peak = c0 + c1 * B^power`` (fitted on the two largest) hits the budget."""
    if len(points) < 2:
        return "n/a"
    (b0, p0), (b1, p1) = sorted(points)[-2:]
    slope = (p1 - p0) / (b1**power - b0**power)
    if slope <= 0:
        return "n/a"
    batch = ((budget_mib - p1) / slope + b1**power) ** (1 / power)
    return f"~{int(batch):,} (fitted)"


def _row(case: dict, result: dict | None, budget_mib: float) -> str:
    label = f"| {case['loss']} | {case['batch']:,} | {case['method']} |"
    if result is None:
        need = DENSE_MATRICES * case["batch"] ** 2 * 4 / 2**30
        return (
            f"{label} skipped: dense logits need ~{need:.0f} GiB > {budget_mib:.0f} MiB | | | | |"
        )
    passes = result["seconds"] / result["matmul_pass"]
    ratio = passes / FLOOR_PASSES[case["loss"]]
    cpu_ratio = result["cpu_seconds"] / result["matmul_pass_cpu"] / FLOOR_PASSES[case["loss"]]
    return (
        f"{label} {result['seconds']:.3f} ({result['cpu_seconds']:.3f}) | "
        f"{result['peak_mib']:.0f} | {passes:.2f} | {ratio:.2f}x ({cpu_ratio:.2f}x) | "
        f"{result['load']:.1f} |"
    )


def compare(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()}; threads {args.threads}", flush=True)
    print(
        "| loss | B | method | fwd+bwd s (CPU s) | peak RSS MiB | B^2 d matmul passes | "
        "time / floor (in CPU s) | load |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    fits: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for batch in sorted(args.batches):
        for loss in args.losses:
            for method in ("tiled", "dense", REFERENCE[loss]):
                case = {"loss": loss, "batch": batch, "method": method, "threads": args.threads}
                result = None
                if method == "tiled" or _dense_fits(batch, args.budget_mib):
                    result = _spawn(case, args.limit_gib)
                    fits.setdefault((loss, method), []).append((batch, result["peak_mib"]))
                print(_row(case, result, args.budget_mib), flush=True)
    print(f"\nlargest B within {args.budget_mib:.0f} MiB of peak RSS:\n")
    for (loss, method), points in fits.items():
        power = 1 if method == "tiled" else 2
        print(f"- {loss} {method}: {_largest_batch(points, power, args.budget_mib)}")
    print(f"\nload average after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument(
        "--losses", nargs="+", default=["clip", "sigmoid"], choices=sorted(FLOOR_PASSES)
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--budget-mib", type=float, default=2048, help="memory budget")
    parser.add_argument("--limit-gib", type=float, default=8, help="each worker's RLIMIT_AS")
    parser.add_argument("--interleave", type=int, help="B: tile auto vs ClipLoss, one process")
    parser.add_argument("--repeats", type=int, default=5, help="--interleave: passes each")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave:
        interleaved(args.interleave, args.repeats, args.threads)
        return
    if args.worker:
        limit = int(args.limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    compare(args)


if __name__ == "__main__":
    main()
