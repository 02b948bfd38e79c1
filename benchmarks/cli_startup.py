"""Benchmark the start-up of the ``mmalign`` command against ``import torch``.

Times ``.venv/bin/mmalign --help`` and ``python -c "import torch"`` (and, for scale, a bare
``python -c pass``), each in a fresh process, alternating the commands so that a change in
the machine's load hits them alike. Reports the median wall-clock time and the median CPU
time (user + system of the child) of ``--repeats`` runs as a markdown table, plus the ratio
``mmalign --help`` / ``import torch`` (goal: at most 1/3). Exits 1 when the goal is missed.

Usage:
    .venv/bin/python benchmarks/cli_startup.py              # 5 runs of each command
    .venv/bin/python benchmarks/cli_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL = 1 / 3
"""Largest acceptable ``mmalign --help`` / ``import torch`` wall-time ratio."""


def default_mmalign() -> str:
    """The ``mmalign`` console script beside this interpreter (the virtualenv's)."""
    return str(Path(sys.executable).with_name("mmalign"))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or ``"?"`` elsewhere."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def time_command(command: list[str]) -> tuple[float, float]:
    """``(wall seconds, child CPU seconds)`` of one run of ``command``; it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(commands: dict[str, list[str]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per command, the commands alternating, after one warm-up
    run each (which fills the file cache and is not counted)."""
    for command in commands.values():
        time_command(command)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            times[name].append(time_command(command))
    return {
        name: {
            "wall": statistics.median(wall for wall, _ in runs),
            "cpu": statistics.median(cpu for _, cpu in runs),
        }
        for name, runs in times.items()
    }


def table(results: dict[str, dict[str, float]], help_name: str, torch_name: str) -> str:
    """The markdown table, ending with the ``--help`` / ``import torch`` ratio row."""
    lines = ["| command | median wall ms | median CPU ms |", "|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| `{name}` | {result['wall'] * 1000:.0f} | {result['cpu'] * 1000:.0f} |")
    wall = results[help_name]["wall"] / results[torch_name]["wall"]
    cpu = results[help_name]["cpu"] / results[torch_name]["cpu"]
    lines.append(f"| **--help / import torch** | **{wall:.3f}** | **{cpu:.3f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--mmalign", default=default_mmalign(), help="the console script")
    args = parser.parse_args(argv)
    help_name, torch_name = "mmalign --help", 'python -c "import torch"'
    commands = {
        help_name: [args.mmalign, "--help"],
        torch_name: [sys.executable, "-c", "import torch"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    before = load_average()
    results = measure(commands, args.repeats)
    print(
        f"{args.repeats} runs each, {os.cpu_count()} cores, "
        f"load average {before} before, {load_average()} after\n"
    )
    print(table(results, help_name, torch_name))
    ratio = results[help_name]["wall"] / results[torch_name]["wall"]
    print(f"\ngoal --help <= {GOAL:.3f} x import torch: {'met' if ratio <= GOAL else 'MISSED'}")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
