"""Write the demo datasets ``digits`` and ``digits-sum`` as WebDataset shards.

    mmalign prep make-demo --out data [--seed 0] [--variants 4] [--limit N] [--force]

writes ``data/digits/{train,val,test}-%06d.tar`` and ``data/digits-sum/...`` (8 train
shards, 1 val, 1 test), with ``classes.json``, a dataset card ``README.md`` and a
``summary.json`` in each. A dataset whose ``summary.json`` matches the requested settings is
left as it is (``--force`` rewrites it). Only scikit-learn's bundled digits are used.

Example:
    >>> make_demo(Path("data"), variants=1, limit=100)["digits"]  # doctest: +SKIP
    PosixPath('data/digits')
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.data.shard_writer import ShardWriter
from mmalign.data.video import encode_video
from mmalign.demo.building import build_datasets, count_written, staging_folder
from mmalign.demo.digits import (
    SPLITS,
    VIDEO_FPS,
    caption,
    classes_json,
    dtmf_clip,
    flac_bytes,
    load_sources,
    moving_digit,
    pen_trajectory,
    render_digit,
    seven_segment_graph,
    split_sources,
)
from mmalign.files import write_text
from mmalign.output_owner import Output, check_output, record_output

FORMAT_VERSION = 2
SHARDS_PER_SPLIT = {"train": 8, "val": 1, "test": 1}
Records = Callable[[str, np.ndarray, np.ndarray, np.ndarray, int, int], Iterator[dict[str, Any]]]


def _rng(seed: int, dataset: int, split: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, dataset, SPLITS.index(split), *parts])


def digits_records(
    split: str,
    sources: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    variants: int,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """``variants`` records per source image; every modality shows the image's digit."""
    for source in sources:
        for variant in range(variants):
            rng = _rng(seed, 0, split, int(source), variant)
            digit = int(labels[source])
            text, language = caption(digit, rng)
            yield {
                "__key__": f"{source:04d}_{variant}",
                "png": render_digit(images[source], rng),
                "txt": text,
                "flac": flac_bytes(dtmf_clip(digit, rng)),
                "graph.json": seven_segment_graph(digit, rng),
                "mp4": encode_video(moving_digit(images[source], rng), VIDEO_FPS),
                "npy": pen_trajectory(digit, rng),
                "cls": digit,
                "json": {"digit": digit, "language": language, "source_index": int(source)},
            }


def digits_sum_records(
    split: str,
    sources: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    variants: int,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """Text says a, audio keys b, the image shows (a + b) mod 10; a, b independent uniform."""
    by_class = {digit: sources[labels[sources] == digit] for digit in range(10)}
    for index in range(len(sources) * variants):
        rng = _rng(seed, 1, split, index)
        a, b = (int(value) for value in rng.integers(10, size=2))
        digit = (a + b) % 10
        source = int(rng.choice(by_class[digit]))
        text, language = caption(a, rng)
        yield {
            "__key__": f"{index:06d}",
            "png": render_digit(images[source], rng),
            "txt": text,
            "flac": flac_bytes(dtmf_clip(b, rng)),
            "cls": digit,
            "json": {"a": a, "b": b, "digit": digit, "language": language, "source_index": source},
        }


DATASETS: dict[str, Records] = {"digits": digits_records, "digits-sum": digits_sum_records}


def limit_sources(sources: np.ndarray, labels: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` sources, taken round-robin over the classes (balanced)."""
    if limit is None or limit >= len(sources):
        return sources
    rank_in_class = np.zeros(len(sources), dtype=np.int64)
    for digit in range(10):
        members = labels[sources] == digit
        rank_in_class[members] = np.arange(members.sum())
    order = np.lexsort((labels[sources], rank_in_class))
    return np.sort(sources[order[:limit]])


def write_split(records: Iterator[dict[str, Any]], total: int, directory: Path, split: str) -> list:
    """Write ``total`` records into ``SHARDS_PER_SPLIT[split]`` shards; returns shard names."""
    maxcount = max(1, math.ceil(total / SHARDS_PER_SPLIT[split]))
    pattern = str(directory / f"{split}-%06d.tar")
    with ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=0) as writer:
        for record in count_written(records):
            writer.write(record)
    return sorted(path.name for path in directory.glob(f"{split}-*.tar"))


def _brace(shards: list[str]) -> str:
    if len(shards) == 1:
        return shards[0]
    split = shards[0].split("-")[0]
    return f"{split}-{{000000..{len(shards) - 1:06d}}}.tar"


def dataset_card(name: str, summary: dict[str, Any]) -> str:
    """The README.md of a generated dataset."""
    rows = "\n".join(
        f"| {split} | {info['records']} | `{_brace(info['shards'])}` |"
        for split, info in summary["splits"].items()
    )
    if name == "digits":
        what = (
            "Each record shows one digit in six modalities that all agree with `cls`: an image "
            "of a real handwritten digit, a caption, the DTMF tone of the digit, its "
            "seven-segment drawing as a graph, a short video of the handwritten digit moving, "
            "and the pen trajectory that draws its seven segments."
        )
        fields = (
            "| `png` | 32x32 grey image: a scikit-learn 8x8 digit upsampled, shifted by up to 2 "
            "px, scaled 0.8-1.0, rotated up to 12 degrees |\n"
            "| `txt` | caption naming the digit in words (en/fr/de/es, 4 templates each) |\n"
            "| `flac` | 16 kHz mono, 16-bit: DTMF tone (697/770/852/941 Hz x 1209/1336/1477 "
            "Hz), 0.25-0.6 s, random level and phase, white noise, 0-0.1 s start offset |\n"
            "| `graph.json` | seven-segment drawing: `x` [N, 2] jittered end points of the lit "
            "segments (random node order), `edge_index` [2, E] lit segments, both directions |\n"
            "| `mp4` | 6 frames, 32x32, 6 fps (MPEG-4 Part 2): the handwritten digit, rendered as "
            "`png`, moving at a random velocity of up to 2 px per frame |\n"
            "| `npy` | float32 [2, T]: the pen's (x, y) drawing the lit segments in order a..g, "
            "8 samples per stroke, random scale 0.8-1.2 and offset, noise 0.03 |\n"
            "| `cls` | the digit |\n"
            "| `json` | `digit`, `language`, `source_index` (row of "
            "`sklearn.datasets.load_digits`) |"
        )
    else:
        what = (
            "The higher-order variant: the caption names a digit `a`, the audio keys a digit `b`, "
            "and the image shows a real handwritten `(a + b) mod 10`. `a` and `b` are independent "
            "and uniform, so every pair of modalities is independent; only all three together "
            "carry information. Pairwise objectives (CLIP) cannot predict the image from text + "
            "audio better than chance; Symile can."
        )
        fields = (
            "| `png` | 32x32 grey image of a handwritten (a + b) mod 10 from the same split |\n"
            "| `txt` | caption naming `a` (en/fr/de/es) |\n"
            "| `flac` | 16 kHz DTMF tone of `b` |\n"
            "| `cls` | the image's class, (a + b) mod 10 |\n"
            "| `json` | `a`, `b`, `digit`, `language`, `source_index` |"
        )
    params = summary["params"]
    return f"""# {name}

{what}

Made by `mmalign prep make-demo --out DIR --seed {params["seed"]} --variants \
{params["variants"]}{f" --limit {params['limit']}" if params["limit"] else ""}` from
scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" data
(1,797 images, CC BY 4.0). No download. Source images are split 70/10/20 (stratified, seed
{params["seed"]}), so test images were never seen in training; each source image yields
{params["variants"]} record(s) with independent random variation.

## Splits

| split | records | shards |
|---|---|---|
{rows}

## Fields (file extensions in each record)

| extension | content |
|---|---|
{fields}

## classes.json

`{{"classnames": {{language: [10 words, index = digit]}}, "templates": {{language: [prompt
templates with one "{{}}" for the word]}}}}`, for zero-shot classification with
`ZeroShotClassifier.from_texts(model, classnames["en"], templates["en"])`.
"""


def build_dataset(name: str, directory: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Generate one dataset into ``directory`` (which must not exist) and return its summary."""
    images, labels = load_sources()
    directory.mkdir(parents=True)
    splits = {}
    for split, sources in split_sources(labels, params["seed"]).items():
        sources = limit_sources(sources, labels, params["limit"])
        total = len(sources) * params["variants"]  # as planned_records counts them
        records = DATASETS[name](split, sources, images, labels, params["variants"], params["seed"])
        shards = write_split(records, total, directory, split)
        splits[split] = {"records": total, "sources": len(sources), "shards": shards}
    summary = {"dataset": name, "params": params, "splits": splits}
    classes = json.dumps(classes_json(), ensure_ascii=False, indent=1)
    write_text(directory / "classes.json", classes)
    write_text(directory / "README.md", dataset_card(name, summary))
    write_text(directory / "summary.json", json.dumps(summary, indent=1))
    return summary


def planned_records(params: dict[str, Any]) -> int:
    """The records one dataset built with ``params`` holds (all splits together).

    Example:
        >>> planned_records({"seed": 0, "variants": 2, "limit": 10})
        60
    """
    labels = load_sources()[1]
    splits = split_sources(labels, params["seed"]).values()
    return sum(len(limit_sources(sources, labels, params["limit"])) for sources in splits) * int(
        params["variants"]
    )


def _dataset_summary(directory: Path) -> tuple[dict[str, Any], list[str]] | None:
    """The ``params`` and shard names of the demo dataset in ``directory`` (``None`` when
    its ``summary.json`` is missing or unreadable)."""
    summary_path = directory / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
        shards = [shard for info in summary["splits"].values() for shard in info["shards"]]
        return dict(summary["params"]), shards
    except (ValueError, KeyError, AttributeError, TypeError):  # an unreadable summary
        return None


def is_complete(directory: Path, params: dict[str, Any]) -> bool:
    """Whether ``directory`` holds a finished dataset made with ``params``."""
    found = _dataset_summary(directory)
    return (
        found is not None
        and found[0] == params
        and all((directory / shard).is_file() for shard in found[1])
    )


DATASET_OUTPUT = Output("prep make-demo", "--out", replaced=True, folder="dataset folder")
"""The owner of a demo dataset folder (``OUT/digits``, ``OUT/digits-sum``), replaced whole."""


def build_in_place(name: str, out: Path, params: dict[str, Any]) -> str:
    """Build ``out/name`` through a staging directory renamed when complete; returns a line."""
    directory = out / name
    staging = staging_folder(out, name)
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    summary = build_dataset(name, staging, params)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    record_output(directory, DATASET_OUTPUT)
    counts = ", ".join(f"{split} {info['records']}" for split, info in summary["splits"].items())
    return f"{directory}: {counts} records in {time.perf_counter() - started:.1f} s"


def make_demo(
    out: Path,
    seed: int = 0,
    variants: int = 4,
    limit: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write both demo datasets under ``out`` (in parallel processes, with a progress bar
    unless ``progress`` is false; :func:`~mmalign.demo.building.build_datasets`: a failure or
    a stop removes what is unfinished); returns name -> dir."""
    params = {"seed": seed, "variants": variants, "limit": limit, "version": FORMAT_VERSION}
    todo = []
    for name in DATASETS:
        if not force and is_complete(out / name, params):
            print(f"{out / name}: complete, skipped (use --force to rewrite)")
        else:
            todo.append(name)
    for name in todo:  # a folder of that name that is not a demo dataset is never deleted
        if _dataset_summary(out / name) is None:  # (one from before the records is one)
            check_output(out / name, DATASET_OUTPUT)
    if todo:
        total = len(todo) * planned_records(params)
        for line in build_datasets(build_in_place, out, todo, params, total=total, show=progress):
            print(line)
    return {name: out / name for name in DATASETS}
