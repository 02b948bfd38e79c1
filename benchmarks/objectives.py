"""Benchmark mmalign's objectives against the references, one subprocess per configuration.

* Symile ``n2``: the ``symile`` package's ``Symile("n_squared")`` vs mmalign's blockwise
  ``symile`` (``negatives: n2``) on the same inputs (M = 3, d = 256, B = 128/256/512; M = 4,
  B = 64), plus mmalign alone at B = 2048 (the reference would need about 35 GiB of logits).
* CLIP: open_clip's ``ClipLoss`` vs mmalign's ``clip`` at B = 1024 and 4096, d = 512.

Each row reports the median wall-clock and CPU time (all threads) of one forward + backward
pass and the peak resident memory of its process (and the peak minus the RSS just before the
first pass). Prints a markdown table.

Usage:
    python benchmarks/objectives.py            # full run (a few minutes on 2 cores)
    python benchmarks/objectives.py --quick    # one timed pass per configuration, no B = 2048
    python benchmarks/objectives.py --threads 1  # robust on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SYMILE_CASES = [(3, 128), (3, 256), (3, 512), (4, 64)]
CLIP_BATCHES = [1024, 4096]
LARGE_BATCH = 2048


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _inputs(count: int, rows: int, dim: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return [
        torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
        .detach()
        .requires_grad_()
        for _ in range(count)
    ]


def _loss_function(case: dict):
    import torch

    scale = torch.tensor(10.0, requires_grad=True)
    if case["objective"] == "symile":
        if case["impl"] == "reference":
            from symile import Symile

            reference = Symile("n_squared")
            return lambda tensors: reference(tensors, scale)
        from mmalign.objectives import build_objective

        objective = build_objective({"name": "symile", "negatives": "n2"})
    else:
        if case["impl"] == "reference":
            from open_clip.loss import ClipLoss

            reference = ClipLoss()
            return lambda tensors: reference(tensors[0], tensors[1], scale)
        from mmalign.objectives import build_objective

        objective = build_objective({"name": "clip"})
    return lambda tensors: objective({str(i): t for i, t in enumerate(tensors)}, scale).loss


def run_case(case: dict) -> dict:
    """Time forward + backward of one configuration in this process."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    tensors = _inputs(case["modalities"], case["batch"], case["dim"])
    loss_of = _loss_function(case)
    baseline = _current_rss_mib()
    times, cpu_times = [], []
    for _ in range(case["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of(tensors)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        for tensor in tensors:
            tensor.grad = None
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_mib": _peak_rss_mib(),
        "extra_mib": _peak_rss_mib() - baseline,
        "loss": float(loss),
    }


def _spawn(case: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _cases(quick: bool, threads: int | None) -> list[tuple[str, dict, dict | None]]:
    """(label, mmalign case, reference case or None)."""
    rows = []
    for modalities, batch in SYMILE_CASES:
        base = {"objective": "symile", "modalities": modalities, "batch": batch, "dim": 256}
        base["threads"] = threads
        repeats = 1 if quick or batch >= 512 else 3
        rows.append(
            (
                f"symile n2, M={modalities}, B={batch}, d=256",
                {**base, "impl": "mmalign", "repeats": repeats},
                {**base, "impl": "reference", "repeats": repeats},
            )
        )
    for batch in CLIP_BATCHES:
        base = {"objective": "clip", "modalities": 2, "batch": batch, "dim": 512}
        base["threads"] = threads
        repeats = 3 if quick else 10
        rows.append(
            (
                f"clip, M=2, B={batch}, d=512",
                {**base, "impl": "mmalign", "repeats": repeats},
                {**base, "impl": "reference", "repeats": repeats},
            )
        )
    if not quick:
        base = {"objective": "symile", "modalities": 3, "batch": LARGE_BATCH, "dim": 256}
        base["threads"] = threads
        rows.append(
            (
                f"symile n2, M=3, B={LARGE_BATCH}, d=256",
                {**base, "impl": "mmalign", "repeats": 1},
                None,
            )
        )
    return rows


def _times(result: dict) -> str:
    return f"{result['seconds']:.3f} ({result['cpu_seconds']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pass per case, skip B=2048")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    print(
        "| configuration | reference s (CPU s) | mmalign s (CPU s) | speed-up wall (CPU) | "
        "reference peak RSS MiB (+run) | mmalign peak RSS MiB (+run) | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, ours_case, reference_case in _cases(args.quick, args.threads):
        ours = _spawn(ours_case)
        if reference_case is None:
            print(
                f"| {label} | not run: its logits alone need "
                f"{LARGE_BATCH**3 * 4 / 2**30:.0f} GiB (machine: 24 GiB) | {_times(ours)} "
                f"| - | - | {ours['peak_mib']:.0f} (+{ours['extra_mib']:.0f}) | - |",
                flush=True,
            )
            continue
        reference = _spawn(reference_case)
        print(
            f"| {label} | {_times(reference)} | {_times(ours)} | "
            f"{reference['seconds'] / ours['seconds']:.2f}x "
            f"({reference['cpu_seconds'] / ours['cpu_seconds']:.2f}x) | "
            f"{reference['peak_mib']:.0f} (+{reference['extra_mib']:.0f}) | "
            f"{ours['peak_mib']:.0f} (+{ours['extra_mib']:.0f}) | "
            f"{ours['peak_mib'] / reference['peak_mib']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
