"""Loader throughput: mmalign's ``make_loader`` against a bare webdataset pipeline.

Both read the same digits shards with the same number of DataLoader workers, decode the same
files with the same decoders (``mmalign.data.decode_value``), run the same towers'
``preprocess`` and ``collate`` per batch. The bare pipeline is what a webdataset user writes
by hand (``SimpleShardList`` -> ``split_by_worker`` -> ``tarfile_to_samples`` -> ``map`` ->
``batched``) and has no presence masks, error handling, counters or labels. Two tower sets:

- ``real``: small image (open_clip ViT), text (open_clip BPE), audio (log-mel) and graph
  (GIN) towers: the preprocess work of a real run;
- ``identity``: towers whose preprocess returns the decoded value: decoding only, the
  harshest view of the loader's own overhead.

Reported per pipeline: samples per wall-clock second, and CPU milliseconds per sample (this
process plus its DataLoader workers, which are reaped at the end of each epoch), which stays
meaningful on a shared, busy machine. Overhead = mmalign CPU per sample / bare CPU per sample
- 1; goal: at most 10%. Runs alternate; medians of ``--repeats`` epochs.

Run: ``.venv/bin/python benchmarks/data.py [--shards 'data/digits/train-{000000..000007}.tar']
[--workers 2] [--batch-size 128] [--repeats 3]`` (without ``--shards`` the demo data is made
in a temporary directory).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from mmalign.config import TowerConfig
from mmalign.data import decode_value, expand_shards, make_loader
from mmalign.towers import Tower, build_tower

FIELDS = {"image": "png", "text": "txt", "audio": "flac", "graph": "graph.json"}


class IdentityTower(Tower):
    """Preprocess returns the decoded value; collate returns the list."""

    width = 1

    def __init__(self) -> None:
        super().__init__(TowerConfig(type="identity"))

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        return raw

    def collate(self, items: list[Any]) -> list[Any]:
        return list(items)


def real_towers() -> dict[str, Tower]:
    return {
        "image": build_tower(
            {
                "type": "image",
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
            }
        ),
        "text": build_tower({"type": "text", "width": 64, "heads": 2, "layers": 1}),
        "audio": build_tower({"type": "audio", "n_mels": 32, "clip_seconds": 0.7}),
        "graph": build_tower({"type": "graph", "in_features": 2}),
    }


def bare_pipeline(
    urls: list[str], towers: Mapping[str, Tower], batch_size: int, workers: int
) -> Iterable[dict[str, Any]]:
    """The hand-written webdataset pipeline doing the same decode/preprocess/collate."""

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        return {
            name: towers[name].preprocess(decode_value(ext, sample[ext]))
            for name, ext in FIELDS.items()
        }

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {name: towers[name].collate([s[name] for s in samples]) for name in FIELDS}

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(prepare),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers, collate_fn=keep)


def keep(batch: dict[str, Any]) -> dict[str, Any]:
    """No conversion of the batches (as mmalign's loader)."""
    return batch


def count_mmalign(batches: Iterable[dict[str, Any]]) -> int:
    return sum(len(batch.keys) for batch in batches)


def count_bare(batches: Iterable[dict[str, Any]]) -> int:
    return sum(len(batch["text"]) for batch in batches)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run: Callable[[], int]) -> tuple[float, float, int]:
    """(samples per wall-clock second, CPU milliseconds per sample, samples) of one epoch."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    samples = run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return samples / wall, 1000 * cpu / samples, samples


def measure(urls: list[str], towers: dict[str, Tower], args: argparse.Namespace) -> dict:
    loader = make_loader(urls, towers, FIELDS, args.batch_size, workers=args.workers)
    runs = {
        "mmalign": lambda: count_mmalign(loader),
        "bare": lambda: count_bare(bare_pipeline(urls, towers, args.batch_size, args.workers)),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    costs: dict[str, list[float]] = {name: [] for name in runs}
    counts = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            rate, cost, counts[name] = timed(run)
            rates[name].append(rate)
            costs[name].append(cost)
    if counts["mmalign"] != counts["bare"]:
        raise RuntimeError(f"the pipelines read different sample counts: {counts}")
    rate = {name: statistics.median(values) for name, values in rates.items()}
    cost = {name: statistics.median(values) for name, values in costs.items()}
    return {
        "samples": counts["bare"],
        "rate": rate,
        "cost": cost,
        "overhead": cost["mmalign"] / cost["bare"] - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default=None, help="digits shards (default: make them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards
        if shards is None:
            from mmalign.demo.data import make_demo

            make_demo(Path(scratch), variants=1)
            shards = str(Path(scratch) / "digits" / "train-{000000..000007}.tar")
        urls = expand_shards(shards)
        print(f"{len(urls)} shards, workers {args.workers}, batch {args.batch_size}")
        print(
            "| towers | samples | mmalign samples/s | bare samples/s | mmalign CPU ms/sample "
            "| bare CPU ms/sample | CPU overhead |"
        )
        print("|---|---|---|---|---|---|---|")
        identity = {field: IdentityTower() for field in FIELDS}
        for name, towers in [("identity", identity), ("real", real_towers())]:
            result = measure(urls, towers, args)
            rate, cost = result["rate"], result["cost"]
            print(
                f"| {name} | {result['samples']} | {rate['mmalign']:.0f} | {rate['bare']:.0f} "
                f"| {cost['mmalign']:.2f} | {cost['bare']:.2f} | {100 * result['overhead']:+.1f}% |"
            )


if __name__ == "__main__":
    main()
