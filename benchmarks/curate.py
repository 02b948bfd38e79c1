"""``mmalign prep curate`` on demo digits with planted faults: how many of the faults it
removes and how many clean records it keeps.

A small image-text model (the image and text towers of the demo config) is trained on the
digits ``train`` split. The ``val`` and ``test`` splits (records the model never saw) are
then corrupted: ``--swapped`` of the records get the caption of another digit (in a random
language and template, as the demo writes captions), and ``--duplicated`` of the records are
copied once more under a new key. ``mmalign prep curate`` runs on the corrupted shards with
``--threshold`` (the cosine cut) and the default near-duplicate search; reported: the share
of swapped records removed, of duplicate copies removed, of clean records kept. Goal (issue
26): >= 90%, >= 90%, >= 95%.

Run: ``.venv/bin/python benchmarks/curate.py [--demo data/demo] [--steps 150]
[--threshold 0.45] [--out /tmp/curate-bench]`` (without ``--demo`` the demo data is made in
``--out``).
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
import yaml

from mmalign.cli.main import main as mmalign
from mmalign.data.records import read_shards
from mmalign.demo import digits

CONFIG = Path(__file__).parents[1] / "mmalign/demo/configs/demo_digits.yaml"


def train_model(demo: Path, out: Path, steps: int) -> Path:
    """The demo config with the image and text towers only, trained for ``steps``."""
    config = yaml.safe_load(CONFIG.read_text())
    towers = config["model"]["towers"]
    config["model"]["towers"] = {name: towers[name] for name in ("image", "text")}
    config["model"].pop("matryoshka", None)
    config["data"].update(
        train=str(demo / "digits/train-{000000..000007}.tar"),
        val=None,
        test=None,
        classes=None,
        fields={"image": "png", "text": "txt"},
        workers=0,
    )
    config["train"].update(steps=steps, output=str(out / "model_run"), plots=False)
    config["eval"] = {}
    path = out / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    if mmalign(["train", str(path)]) != 0:
        raise RuntimeError("training failed")
    return out / "model_run"


def corrupt(demo: Path, out: Path, swapped: float, duplicated: float) -> dict[str, set[str]]:
    """Write ``out/corrupted-000000.tar`` from the val and test shards; the keys by kind."""
    rng = np.random.default_rng(26)
    urls = [str(demo / "digits/val-000000.tar"), str(demo / "digits/test-000000.tar")]
    kinds: dict[str, set[str]] = {"clean": set(), "swapped": set(), "duplicate": set()}
    with wds.TarWriter(str(out / "corrupted-000000.tar")) as writer:
        for raw in read_shards({"url": url} for url in urls):
            record: dict[str, Any] = {k: v for k, v in raw.items() if k != "__url__"}
            if rng.random() < swapped:
                digit = int(record["cls"])
                wrong = int((digit + rng.integers(1, 10)) % 10)
                record["txt"] = digits.caption(wrong, rng)[0].encode()
                kinds["swapped"].add(record["__key__"])
            else:
                kinds["clean"].add(record["__key__"])
            writer.write(record)
            if rng.random() < duplicated:
                copy = {**record, "__key__": record["__key__"] + "_copy"}
                kinds["duplicate"].add(copy["__key__"])
                writer.write(copy)
    return kinds


def kept_keys(directory: Path) -> set[str]:
    shards = sorted(directory.glob("curated-*.tar"))
    return {raw["__key__"] for raw in read_shards({"url": str(path)} for path in shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=None, help="make-demo output directory")
    parser.add_argument("--out", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.45)
    parser.add_argument("--swapped", type=float, default=0.15)
    parser.add_argument("--duplicated", type=float, default=0.05)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    demo = args.demo
    if demo is None:
        demo = args.out / "demo"
        mmalign(["prep", "make-demo", "--out", str(demo), "--variants", "1"])
    run = train_model(demo, args.out, args.steps)
    kinds = corrupt(demo, args.out, args.swapped, args.duplicated)
    curated = args.out / "curated"
    corrupted = str(args.out / "corrupted-000000.tar")
    arguments = ["curate", str(run), "--data", corrupted, "--out", str(curated)]
    status = mmalign(["prep", *arguments, "--threshold", str(args.threshold)])
    if status != 0:
        raise RuntimeError("curate failed")
    kept = kept_keys(curated)
    removed = {kind: len(keys - kept) / max(len(keys), 1) for kind, keys in kinds.items()}
    print(f"records: { {kind: len(keys) for kind, keys in kinds.items()} }")
    print("| swapped removed | duplicates removed | clean kept |")
    print("|---|---|---|")
    print(f"| {removed['swapped']:.1%} | {removed['duplicate']:.1%} | {1 - removed['clean']:.1%} |")


if __name__ == "__main__":
    main()
