"""Matryoshka benchmark on demo digits: nested prefixes vs plain truncation.

Trains the demo digits model's image and text towers (the audio and graph towers left out to
fit a shared CPU) twice with the same steps and seed, at ``model.dim: 128``: once
with ``model.matryoshka: [8, 16, 32, 64, 128]`` and once without, then measures on the test
split, at every prefix ``d`` (first ``d`` coordinates, renormalized):

- class-level text->image R@1 (a hit is any image of the caption's digit);
- zero-shot image top-1 from the English class prompts (``ZeroShotClassifier(dim=d)``).

Both runs validate every ``--eval-every`` steps, so their ``metrics.jsonl`` also serve
``benchmarks/label_free.py`` (label-free metrics vs labelled ones across checkpoints).

Run (CPU; data from ``mmalign prep make-demo --out data/demo``):

    .venv/bin/python benchmarks/matryoshka.py --data data/demo --out runs/bench_mrl \
        --steps 200 --batch-size 128

``--measure NAME=MODEL_DIR`` (repeatable) trains nothing and measures already trained
models instead, at the prefixes up to their ``model.dim``, e.g. the digits model of
``mmalign demo`` (``matryoshka: [16, 32, 64]``) against one trained without the prefixes:

    .venv/bin/python benchmarks/matryoshka.py --out runs/bench_mrl \
        --measure plain=runs/demo_plain/digits/model --measure matryoshka=runs/demo/digits/model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmalign.config import load_config
from mmalign.demo.pipeline import default_configs_dir
from mmalign.embeddings import truncate
from mmalign.eval.loading import collect_embeddings
from mmalign.eval.retrieval import retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier, evaluate_zeroshot, load_classes
from mmalign.model import AlignmentModel
from mmalign.training import train

PREFIXES = [8, 16, 32, 64, 128]


def run_config(
    data: Path, out: Path, steps: int, batch_size: int, eval_every: int, matryoshka: bool
) -> dict:
    """The demo digits config at dim 128, with or without the Matryoshka prefixes."""
    config = load_config(default_configs_dir() / "demo_digits.yaml").to_dict()
    digits = data / "digits"
    config["model"]["dim"] = PREFIXES[-1]
    config["model"]["towers"] = {m: config["model"]["towers"][m] for m in ("image", "text")}
    config["model"]["matryoshka"] = PREFIXES if matryoshka else None
    config["data"]["fields"] = {"image": "png", "text": "txt"}
    config["data"] |= {
        "train": str(digits / "train-{000000..000007}.tar"),
        "val": str(digits / "val-000000.tar"),
        "test": str(digits / "test-000000.tar"),
        "classes": str(digits / "classes.json"),
        "batch_size": batch_size,
    }
    config["train"] |= {"steps": steps, "warmup": steps // 10, "output": str(out), "plots": False}
    config["eval"] |= {"every": eval_every}
    return config


def measure(model_dir: Path, data: Path) -> dict[str, dict[str, float]]:
    """Text->image class-level R@1 and zero-shot top-1 at each prefix."""
    model = AlignmentModel.from_pretrained(model_dir)
    digits = data / "digits"
    collected = collect_embeddings(
        model,
        str(digits / "test-000000.tar"),
        ["image", "text"],
        fields={"image": "png", "text": "txt"},
        label_field="cls",
        batch_size=256,
    )
    classnames, prompts = load_classes(digits / "classes.json", "en")
    labels = collected.labels
    results = {}
    for dim in [prefix for prefix in PREFIXES if prefix <= model.dim]:
        images = truncate(collected.embeddings["image"], dim)
        texts = truncate(collected.embeddings["text"], dim)
        recall = retrieval_metrics(texts, images, labels, labels, ks=(1,))["q2g/R@1"]
        classifier = ZeroShotClassifier(model, prompts, "text", classnames=classnames, dim=dim)
        zeroshot = evaluate_zeroshot(classifier, collected, ["image"], ks=(1,))
        results[str(dim)] = {
            "text->image R@1": recall,
            "zero-shot top-1": zeroshot["metrics"]["top1"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_mrl"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--measure",
        action="append",
        default=[],
        metavar="NAME=MODEL_DIR",
        help="measure this trained model instead of training (repeatable)",
    )
    args = parser.parse_args()
    report = {}
    for name, model_dir in (item.split("=", 1) for item in args.measure):
        report[name] = {"model": model_dir, "prefixes": measure(Path(model_dir), args.data)}
        print(json.dumps({name: report[name]}), flush=True)
    for name, matryoshka in () if args.measure else (("matryoshka", True), ("plain", False)):
        out = args.out / name
        started = time.perf_counter()
        config = run_config(
            args.data, out, args.steps, args.batch_size, args.eval_every, matryoshka
        )
        train(config)
        seconds = time.perf_counter() - started
        report[name] = {"train_seconds": seconds, "prefixes": measure(out / "model", args.data)}
        print(json.dumps({name: report[name]}), flush=True)
    print("| prefix | " + " | ".join(f"{n} R@1 | {n} zero-shot" for n in report) + " |")
    print("|---" * (1 + 2 * len(report)) + "|")
    for dim in PREFIXES:
        cells = []
        for name in report:
            values = report[name]["prefixes"].get(str(dim))
            if values is None:
                cells += ["-", "-"]
                continue
            cells += [f"{values['text->image R@1']:.1%}", f"{values['zero-shot top-1']:.1%}"]
        print(f"| {dim} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matryoshka.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
