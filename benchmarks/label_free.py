"""How well label-free validation metrics track a labelled one across checkpoints.

Reads the validations of one or more runs (``metrics.jsonl``: each validation is the
checkpoint of that step) and reports, per label-free metric, the Spearman rank correlation
with the labelled metric (default ``val/zeroshot/top1``) over all validations of all runs,
and the labelled value of the checkpoint each metric would pick as best (its better end:
higher RankMe, lower alignment, uniformity, gap and loss) next to the true best.

Run (after ``benchmarks/matryoshka.py``, which validates every 10 steps):

    .venv/bin/python benchmarks/label_free.py runs/bench_mrl/matryoshka runs/bench_mrl/plain
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

METRICS = {
    "val/rank/mean": "max",
    "val/alignment/mean": "min",
    "val/uniformity/mean": "min",
    "val/gap/mean": "min",
    "val/loss": "min",
}


def validations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "val/loss" in record]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labelled", default="val/zeroshot/top1")
    args = parser.parse_args()
    rows = [record for run in args.runs for record in validations(run)]
    truth = [record[args.labelled] for record in rows]
    best_true = max(truth)
    print(f"{len(rows)} checkpoints of {len(args.runs)} runs; labelled metric {args.labelled}")
    print()
    print(f"| label-free metric | Spearman with {args.labelled} | its pick's {args.labelled} |")
    print("|---|---|---|")
    for name, mode in METRICS.items():
        values = [record[name] for record in rows]
        rho = spearmanr(values, truth).statistic
        sign = 1 if mode == "max" else -1
        pick = max(range(len(rows)), key=lambda i: sign * values[i])
        print(f"| {name} ({mode}) | {rho:+.2f} | {truth[pick]:.1%} (best {best_true:.1%}) |")


if __name__ == "__main__":
    main()
