"""Terms benchmark on demo digits: two_view with few pairs, distillation, a negative queue.

Three experiments, each a few short runs with the same seed and steps (one seed):

- ``two_view``: graph + text towers where only ``--pair-fraction`` (10%) of the training
  records keep their caption (the others are graphs alone), with and without the ``two_view``
  term on the graph (GraphCL augmentations, one picked per view); graph->text class R@1 on
  the test split (a hit: any caption of the graph's digit).
- ``distill``: image + text with an image tower of width ``--student-width`` (the demo's is 8:
  about 4x fewer parameters at half the width), trained alone and distilled from the teacher
  ``--teacher`` (a trained demo model, ``runs/demo/digits/model`` after ``mmalign demo``);
  zero-shot image top-1 (English prompts) and text->image class R@1.
- ``queue``: image + text at batch ``--small-batch``, alone, with ``queue: --queue`` (every
  queued entry a negative), with the queue and ``positives: exclude`` over caption groups
  (``data.group_field: txt``: queued copies of a row's caption are not its negatives), and at
  batch ``--queue`` reached by exact accumulation (``--queue / --small-batch`` micro-batches);
  zero-shot top-1 after the same steps, training time and peak RSS.

Each run is its own process (so its peak memory is its own); results go to
``<out>/terms.json`` and a markdown table, with the mean pairwise cosine of each measured
modality's test embeddings (near 1: a collapsed tower). Run (CPU; data from
``mmalign prep make-demo --out data/demo``):

    .venv/bin/python benchmarks/terms.py --data data/demo --out runs/bench_terms \
        --teacher runs/demo/digits/model

(c) at the issue's sizes, bounded (a step of 4,096 by exact accumulation takes minutes on a
CPU, so the big batch runs 2 steps):

    .venv/bin/python benchmarks/terms.py --data data/demo --out runs/bench_queue \
        --experiments queue --steps 200 --only queue_off queue_on queue_exclude
    .venv/bin/python benchmarks/terms.py --data data/demo --out runs/bench_queue_big \
        --experiments queue --steps 2 --only queue_off queue_big_batch
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from mmalign.config import load_config
from mmalign.demo.pipeline import default_configs_dir
from mmalign.eval.loading import collect_embeddings
from mmalign.eval.retrieval import retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier, evaluate_zeroshot, load_classes
from mmalign.model import AlignmentModel
from mmalign.training import train

GRAPH_AUGMENTATIONS = {
    "augment_node_drop": 0.2,
    "augment_edge_perturb": 0.2,
    "augment_attr_mask": 0.2,
    "augment_subgraph": 0.2,
    "augment_pick_one": True,
}
FIELDS = {"image": "png", "text": "txt", "graph": "graph.json"}


def base_config(args: argparse.Namespace, towers: list[str], train_shards: str, out: Path) -> dict:
    """The demo digits config cut to ``towers``, without validation, ``args.steps`` steps."""
    config = load_config(default_configs_dir() / "demo_digits.yaml").to_dict()
    digits = args.data / "digits"
    config["model"]["towers"] = {m: config["model"]["towers"][m] for m in towers}
    config["model"]["matryoshka"] = None
    config["data"] |= {
        "train": train_shards,
        "val": None,
        "test": str(digits / "test-000000.tar"),
        "classes": str(digits / "classes.json"),
        "fields": {m: FIELDS[m] for m in towers},
        "batch_size": args.batch_size,
    }
    config["train"] |= {
        "steps": args.steps,
        "warmup": max(args.steps // 10, 1),
        "output": str(out),
        "plots": False,
        "log_every": max(args.steps // 5, 1),
    }
    config["eval"] |= {"every": 0, "zeroshot_modality": towers[0]}
    return config


def few_pairs(args: argparse.Namespace) -> str:
    """Training shards where only ``pair_fraction`` of the records keep their caption."""
    source = sorted((args.data / "digits").glob("train-*.tar"))
    out = args.out / "few_pairs"
    pattern = str(out / f"train-{{000000..{len(source) - 1:06d}}}.tar")
    if (out / "done").exists():
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    for index, shard in enumerate(source):
        with wds.TarWriter(str(out / f"train-{index:06d}.tar")) as writer:
            for record in wds.WebDataset(str(shard), shardshuffle=False):
                record = {k: v for k, v in record.items() if k != "__url__"}
                if torch.rand((), generator=_generator(record["__key__"])) >= args.pair_fraction:
                    record.pop("txt", None)
                else:
                    kept += 1
                writer.write(record)
    print(f"few pairs: {kept} records keep their caption", flush=True)
    (out / "done").write_text(f"{kept}\n")
    return pattern


def _generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(key)) % 2**31)


def variant_config(args: argparse.Namespace, name: str) -> dict:
    """The run config of one variant (see the module docstring)."""
    out = args.out / name
    digits = str(args.data / "digits" / "train-{000000..000007}.tar")
    if name.startswith("two_view"):
        config = base_config(args, ["graph", "text"], str(args.out / "few_pairs"), out)
        config["model"]["towers"]["graph"] |= GRAPH_AUGMENTATIONS
        if name == "two_view_on":
            config["model"]["objective"]["terms"] = [
                {"type": "two_view", "modality": "graph", "temperature": 0.2}
            ]
        return config
    if name.startswith("distill"):
        config = base_config(args, ["image", "text"], digits, out)
        config["model"]["towers"]["image"]["vision_cfg"]["width"] = args.student_width
        if name == "distill_on":
            config["model"]["objective"]["terms"] = [
                {"type": "distill", "teacher": str(args.teacher)}
            ]
        return config
    config = base_config(args, ["image", "text"], digits, out)
    config["data"]["batch_size"] = args.small_batch
    if name in ("queue_on", "queue_exclude"):
        config["model"]["objective"]["terms"] = [
            {"type": "queue", "size": args.queue, "weight": args.queue_weight}
        ]
    if name == "queue_exclude":
        config["data"]["group_field"] = "txt"
        config["model"]["objective"]["positives"] = "exclude"
    if name == "queue_big_batch":
        config["train"]["accumulate"] = args.queue // args.small_batch
    return config


def measure(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Class-level retrieval R@1 between the model's modalities and zero-shot top-1."""
    model = AlignmentModel.from_pretrained(model_dir)
    digits = args.data / "digits"
    modalities = model.modalities
    collected = collect_embeddings(
        model,
        str(digits / "test-000000.tar"),
        modalities,
        fields={m: FIELDS[m] for m in modalities},
        label_field="cls",
        batch_size=256,
    )
    labels = collected.labels
    query = "graph" if "graph" in modalities else "text"
    gallery = "text" if query == "graph" else "image"
    recall = retrieval_metrics(
        collected.embeddings[query], collected.embeddings[gallery], labels, labels, ks=(1,)
    )["q2g/R@1"]
    results = {f"{query}->{gallery} R@1": recall}
    for name in (query, gallery):  # near 1: the tower collapsed (every input one embedding)
        unit = torch.nn.functional.normalize(collected.embeddings[name].float(), dim=-1)
        results[f"{name} mean cosine"] = float((unit @ unit.T).mean())
    if "image" in modalities:
        classnames, prompts = load_classes(digits / "classes.json", "en")
        classifier = ZeroShotClassifier(model, prompts, "text", classnames=classnames)
        zeroshot = evaluate_zeroshot(classifier, collected, ["image"], ks=(1,))
        results["zero-shot top-1"] = zeroshot["metrics"]["top1"]
        results["image tower parameters"] = sum(
            p.numel() for p in model.tower("image").parameters()
        )
    return results


def run_variant(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Train one variant in this process and measure it (time, peak RSS)."""
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out / name, ignore_errors=True)  # a fresh run each time
    started = time.perf_counter()
    train(variant_config(args, name))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "train_seconds": seconds,
        "peak_rss_mib": peak,
        **measure(args.out / name / "model", args),
    }


EXPERIMENTS = {
    "two_view": ["two_view_off", "two_view_on"],
    "distill": ["distill_off", "distill_on"],
    "queue": ["queue_off", "queue_on", "queue_exclude", "queue_big_batch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_terms"))
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/digits/model"))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pair-fraction", type=float, default=0.1)
    parser.add_argument("--student-width", type=int, default=4)
    parser.add_argument("--small-batch", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--queue-weight", type=float, default=1.0)
    parser.add_argument("--only", nargs="+", help="run only these variants (e.g. queue_on)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=8.0)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args, args.variant)), flush=True)
        return
    if "two_view" in args.experiments:
        few_pairs(args)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for experiment in args.experiments:
        for name in EXPERIMENTS[experiment]:
            if args.only and name not in args.only:
                continue
            command = [sys.executable, *sys.argv, "--variant", name]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            report[name] = json.loads(lines[-1].removeprefix("RESULT "))
            print(json.dumps({name: report[name]}), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "terms.json").write_text(json.dumps(report, indent=2))
    print("| run | " + " | ".join(["metric", "value", "train s", "peak RSS MiB"]) + " |")
    print("|---|---|---|---|---|")
    for name, values in report.items():
        if name == "args":
            continue
        for metric in [k for k in values if "R@1" in k or "top-1" in k]:
            print(
                f"| {name} | {metric} | {values[metric]:.1%} | {values['train_seconds']:.0f} | "
                f"{values['peak_rss_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
