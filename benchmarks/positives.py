"""Benchmark same-group positives and hard negatives on the demo digits (issue 15).

Trains the demo's image and text towers (``demo_digits.yaml`` without audio and graph) on the
digits shards at equal steps, batch and seeds, once per variant:

* ``instance``: CLIP as it always was;
* ``multi`` / ``exclude`` / ``debiased`` (``tau_plus`` 0.1, ten balanced classes): groups
  from ``data.group_field: cls`` (``debiased`` needs none);
* ``neighbours``: ``instance`` on shards rewritten by ``mmalign prep group-shards`` (k-means
  of the ``instance`` model's train-image embeddings) with a shuffle buffer smaller than a
  cluster, so batches hold neighbours;
* ``mined``: ``instance`` plus ``mmalign prep mine-negatives`` text negatives of each image
  (from the same export; other classes only, ``--group-field cls``), used through
  ``data.negatives: text`` and ``model.objective.hard_negatives: true``;
* ``sample`` / ``expand``: the train records with three captions each (``txt``, ``1.txt``,
  ``2.txt``; the two extra ones drawn by the demo's caption generator from a hash of the key),
  ``data.views: {text: sample}`` (one caption per pass) against ``{text: expand}`` (one row
  per caption, the record's image encoded once), both with ``positives: multi`` (a record's
  captions are one group under ``expand``; ``sample`` rows are their own groups).

On the test split it reports image<->text R@1 at the instance level (the record's own
caption) and the class level (any caption of the class), zero-shot top-1 (images against the
class prompts of every language) and the compute time per step (the trainer's
forward + loss + backward + optimizer sections) relative to ``instance``.

Then Symile ``n2`` without groups (``instance``) and with them (``multi``, ``exclude``: 10
groups; ``debiased``: needs none) at B = 512, M = 3, d = 256: time and peak resident memory of
one forward + backward, each in its own process, the cases interleaved round by round (the
machine is shared: the per-round ratio to ``instance`` is steadier than the times).

Usage:
    python benchmarks/positives.py --data data/demo/digits --out runs/bench-positives
    python benchmarks/positives.py --reuse          # evaluate finished runs again
    python benchmarks/positives.py --symile-only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FIELDS = {"image": "png", "text": "txt"}
VARIANTS = ["instance", "multi", "exclude", "debiased", "neighbours", "mined", "sample", "expand"]
CAPTIONS = 3


def _base_config(data: Path, out: Path, steps: int, batch: int) -> dict[str, Any]:
    from mmalign.config import load_config
    from mmalign.demo.pipeline import default_configs_dir

    config = load_config(default_configs_dir() / "demo_digits.yaml").to_dict()
    towers = config["model"]["towers"]
    config["model"]["towers"] = {name: towers[name] for name in FIELDS}
    config["data"].update(
        train=sorted(str(p) for p in data.glob("train-*.tar")),
        val=None,
        test=str(data / "test-000000.tar"),
        fields=dict(FIELDS),
        classes=str(data / "classes.json"),
        batch_size=batch,
        shuffle_buffer=256,
    )
    config["train"].update(steps=steps, warmup=min(20, steps // 10), output=str(out))
    config["eval"].update(every=0, best_metric="val/loss", best_mode="min")
    return config


def _variant(name: str, base: dict[str, Any], out: Path, prepared: dict[str, str]) -> dict:
    config = json.loads(json.dumps(base))
    config["train"]["output"] = str(out / name)
    objective, data = config["model"]["objective"], config["data"]
    if name in ("multi", "exclude"):
        objective["positives"] = name
        data["group_field"] = "cls"
    elif name == "debiased":
        objective.update(positives="debiased", tau_plus=0.1)
    elif name == "neighbours":
        data.update(train=prepared["neighbours"], shuffle_buffer=32)
    elif name == "mined":
        data.update(train=prepared["mined"], negatives="text")
        objective["hard_negatives"] = True
    elif name in ("sample", "expand"):
        data.update(train=prepared["captions"], views={"text": name})
        objective["positives"] = "multi"
    return config


def _caption_shards(data: Path, out: Path) -> list[str]:
    """The train records with ``CAPTIONS`` captions each: ``txt`` and ``1.txt`` ... drawn by
    :func:`mmalign.demo.digits.caption` from a seed hashed from the record's key."""
    import numpy as np
    import webdataset as wds

    from mmalign.data.views import stable_hash
    from mmalign.demo.digits import caption

    directory = out / "captions"
    if not any(directory.glob("data-*.tar")):
        directory.mkdir(parents=True, exist_ok=True)
        pattern = str(directory / "data-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=1000, verbose=0, mtime=0) as writer:
            for url in sorted(data.glob("train-*.tar")):
                for sample in wds.WebDataset(str(url), shardshuffle=False, empty_check=False):
                    record = {k: v for k, v in sample.items() if k == "__key__" or k[0] != "_"}
                    rng = np.random.default_rng(stable_hash(sample["__key__"]) % 2**32)
                    digit = int(sample["cls"])
                    for index in range(1, CAPTIONS):
                        record[f"{index}.txt"] = caption(digit, rng)[0]
                    writer.write(record)
    return sorted(str(p) for p in directory.glob("data-*.tar"))


def _step_seconds(run_dir: Path, section: str = "") -> float:
    """Median over logged intervals (the first one left out) of the timed step sections
    (``time/<section>`` alone when given)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    totals = [
        sum(value for key, value in record.items() if key.startswith(f"time/{section}"))
        for record in records
        if any(key.startswith("time/") for key in record)
    ]
    return statistics.median(totals[1:] or totals)


def _evaluate(model_dir: Path, data: Path) -> dict[str, float]:
    from mmalign.eval.loading import collect_embeddings
    from mmalign.eval.retrieval import retrieval_metrics
    from mmalign.eval.zeroshot import run_zeroshot
    from mmalign.model import AlignmentModel

    model = AlignmentModel.from_pretrained(model_dir).eval()
    test = str(data / "test-000000.tar")
    collected = collect_embeddings(
        model, test, list(FIELDS), fields=FIELDS, label_field="cls", batch_size=256
    )
    image, text = collected.embeddings["image"], collected.embeddings["text"]
    own = retrieval_metrics(image, text, collected.keys, collected.keys, ks=(1,))
    labels = collected.labels.tolist()
    by_class = retrieval_metrics(image, text, labels, labels, ks=(1,))
    zeroshot = run_zeroshot(
        model, test, data / "classes.json", ["image"], language="all", fields=FIELDS
    )
    return {
        "instance i2t R@1": own["q2g/R@1"],
        "instance t2i R@1": own["g2q/R@1"],
        "class i2t R@1": by_class["q2g/R@1"],
        "class t2i R@1": by_class["g2q/R@1"],
        "zero-shot top-1": zeroshot["metrics"]["top1"],
    }


def _prepare(instance_model: Path, base: dict[str, Any], out: Path) -> dict[str, str]:
    """Export the train set with the ``instance`` model, then group and mine from it."""
    from mmalign.export import export_embeddings
    from mmalign.model import AlignmentModel
    from mmalign.prep.group_shards import group_shards
    from mmalign.prep.mine_negatives import mine_negatives

    export = out / "export-train"
    model = AlignmentModel.from_pretrained(instance_model).eval()
    export_embeddings(
        model,
        base["data"]["train"],
        list(FIELDS),
        export,
        fields=FIELDS,
        metadata_fields=["cls"],
        batch_size=256,
        progress=False,
    )
    group_shards(export, "image", 40, out / "neighbours", maxcount=640)
    mine_negatives(export, "image", "text", 2, 0.95, out / "mined", group_field="cls")
    return {
        name: sorted(str(p) for p in (out / name).glob("data-*.tar"))
        for name in ("neighbours", "mined")
    }


def train_variants(
    data: Path, out: Path, steps: int, batch: int, variants: list[str], reuse: bool
) -> list:
    from mmalign.training import train

    base = _base_config(data, out / "base", steps, batch)
    prepared: dict[str, str] = {}
    rows = []
    for name in variants:
        if name in ("neighbours", "mined") and "mined" not in prepared:
            prepared.update(_prepare(out / "instance" / "model", base, out))
        if name in ("sample", "expand") and "captions" not in prepared:
            prepared["captions"] = _caption_shards(data, out)
        config = _variant(name, base, out, prepared)
        run_dir = out / name
        if not (reuse and (run_dir / "model").is_dir()):
            train(config)
        row = {
            "variant": name,
            "step_s": _step_seconds(run_dir),
            "loss_s": _step_seconds(run_dir, "loss"),
        }
        row.update(_evaluate(run_dir / "model", data))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SYMILE_MODES = ["instance", "multi", "exclude", "debiased"]


def run_symile_case(mode: str, batch: int, dim: int) -> dict[str, float]:
    """One forward + backward of symile ``n2`` with ``positives: mode`` (10 groups)."""
    import torch

    from mmalign.objectives import build_objective

    generator = torch.Generator().manual_seed(0)
    tensors = {
        str(m): torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
        .detach()
        .requires_grad_()
        for m in range(3)
    }
    objective = build_objective({"name": "symile", "negatives": "n2", "positives": mode})
    labels = None if mode == "instance" else torch.arange(batch) % 10
    start, start_cpu = time.perf_counter(), time.process_time()
    objective(tensors, torch.tensor(10.0), groups=labels).loss.backward()
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def symile_rows(batch: int, dim: int, repeats: int) -> list[dict[str, Any]]:
    """Per mode: median wall and CPU time (all threads of the process; steadier than wall time
    on a shared machine), median per-round ratios to ``instance``, largest peak memory."""
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in SYMILE_MODES}
    for round_index in range(repeats):
        for mode in SYMILE_MODES:
            case = json.dumps({"mode": mode, "batch": batch, "dim": dim})
            command = [sys.executable, __file__, "--symile-worker", case]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))
            print(f"round {round_index} {mode}: {runs[mode][-1]} load {_load_average()}")
    rows = []
    for mode, measured in runs.items():
        row: dict[str, Any] = {"mode": mode}
        for key in ("seconds", "cpu_seconds"):
            row[key] = statistics.median(m[key] for m in measured)
            ratios = [m[key] / i[key] for m, i in zip(measured, runs["instance"])]
            row[f"{key}_ratio"] = statistics.median(ratios)
        row["peak_mib"] = max(m["peak_mib"] for m in measured)
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    reference = next(row["step_s"] for row in rows if row["variant"] == "instance")
    keys = ["instance i2t R@1", "instance t2i R@1", "class i2t R@1", "class t2i R@1"]
    lines = [
        "| variant | "
        + " | ".join(keys)
        + " | zero-shot top-1 | s/step | vs instance | loss s/step |",
        "|---|" + "---:|" * (len(keys) + 4),
    ]
    for row in rows:
        values = " | ".join(f"{row[key]:.3f}" for key in [*keys, "zero-shot top-1"])
        ratio = row["step_s"] / reference
        times = f"{row['step_s']:.3f} | {ratio:.2f}x | {row['loss_s']:.3f}"
        lines.append(f"| {row['variant']} | {values} | {times} |")
    return "\n".join(lines)


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo/digits"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-positives"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--symile-only", action="store_true")
    parser.add_argument("--symile-batch", type=int, default=512)
    parser.add_argument("--symile-repeats", type=int, default=3, help="0: no symile part")
    parser.add_argument("--symile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.symile_worker:
        case = json.loads(args.symile_worker)
        print(json.dumps(run_symile_case(**case)))
        return
    print(f"load average before: {_load_average()}", flush=True)
    if not args.symile_only:
        if "instance" not in args.variants:
            raise SystemExit("--variants needs instance (the reference and the export model)")
        rows = train_variants(
            args.data, args.out, args.steps, args.batch, args.variants, args.reuse
        )
        print(_table(rows))
    if args.symile_repeats == 0:
        print(f"load average after: {_load_average()}", flush=True)
        return
    symile = symile_rows(args.symile_batch, 256, args.symile_repeats)
    print(
        f"| symile n2, B = {args.symile_batch} | wall s (fwd+bwd) | vs instance "
        "| CPU s | vs instance | peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in symile:
        wall = f"{row['seconds']:.2f} | {row['seconds_ratio']:.2f}x"
        cpu = f"{row['cpu_seconds']:.2f} | {row['cpu_seconds_ratio']:.2f}x"
        print(f"| {row['mode']} | {wall} | {cpu} | {row['peak_mib']:.0f} |")
    print(f"load average after: {_load_average()}", flush=True)


if __name__ == "__main__":
    main()
