"""Resume time in the middle of an epoch: replaying the consumed batches (before) against
the loader's resume mark (after).

One epoch of image-text shards is read to half its batches: the digits shards (32 px PNGs,
the small towers of ``benchmarks/data.py``), or with ``--photos N`` N synthetic 256 px JPEG
photos with captions in img2dataset's layout, read at 224 px (the preprocessing of a
ViT-B-32-sized image tower); a shuffle buffer of ``--shuffle-buffer`` records either way.
The stream's position then holds the batch count and the loader's mark. Resuming is timed
both ways, alternating, in this process: ``replay`` (the position without its mark: what
every resume did before, each consumed batch decoded, preprocessed and collated again) and
``fast`` (with the mark: the consumed records are passed over without decoding, and a
consumed shard none of whose records is still in the shuffle buffer is not even opened;
:mod:`mmalign.data.resume`). Both must then give the same next batches (checked). Timed:
from opening the stream to its first new batch (the same decoding work either way).
Reported: medians of ``--repeats`` seconds and their ratio.

Run: ``.venv/bin/python benchmarks/resume.py
[--shards 'data/demo/digits/train-{000000..000007}.tar' | --photos 2000] [--workers 0]
[--batch-size 64] [--shuffle-buffer 256] [--repeats 3]`` (without ``--shards`` or
``--photos``, the demo data is made in a temporary directory).
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from mmalign.data import make_loader
from mmalign.towers import build_tower
from mmalign.training.stream import EpochStream

FIELDS = {"image": "png;jpg", "text": "txt"}
CHECKED = 3
"""Batches after the resume point compared between the two ways."""


def towers(image_size: int) -> dict[str, Any]:
    return {
        "image": build_tower(
            {
                "type": "image",
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": image_size,
                    "patch_size": 32,
                    "width": 64,
                    "layers": 1,
                },
            }
        ),
        "text": build_tower({"type": "text", "width": 64, "heads": 2, "layers": 1}),
    }


def write_photos(folder: Path, count: int, per_shard: int = 250) -> str:
    """``count`` 256 px JPEG photos (noise and shapes) with captions, img2dataset-style."""
    rng = np.random.default_rng(0)
    shards = (count + per_shard - 1) // per_shard
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                ImageDraw.Draw(image).ellipse([40, 40, 200, 200], fill=(200, 30, 30))
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=85)
                caption = f"photo {index}: a red circle on noise"
                writer.write({"__key__": f"{index:09d}", "jpg": jpeg.getvalue(), "txt": caption})
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def loaders(shards: str, image_size: int, args: argparse.Namespace) -> Callable[[int], Any]:
    built = towers(image_size)
    return lambda seed: make_loader(
        shards,
        built,
        FIELDS,
        args.batch_size,
        workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        seed=seed,
        drop_last=True,
    )


def half_epoch_position(make: Callable[[int], Any]) -> dict[str, Any]:
    """The stream position after half of the first epoch's batches (with its mark)."""
    total = sum(1 for _ in make(0))
    stream = EpochStream(make)
    for _ in range(total // 2):
        next(stream)
    return stream.position()


def resume(make: Callable[[int], Any], position: dict[str, Any]) -> tuple[float, list]:
    """Seconds to resume at ``position`` up to the first new batch (included: the records
    are passed over as it is read), and the next batches' keys."""
    start = time.perf_counter()
    stream = EpochStream(make, position=dict(position))
    keys = [next(stream).keys]
    seconds = time.perf_counter() - start
    return seconds, keys + [next(stream).keys for _ in range(CHECKED - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default=None, help="digits shards (default: make them)")
    parser.add_argument("--photos", type=int, default=0, help="256 px JPEG photos instead")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    with tempfile.TemporaryDirectory() as scratch:
        shards, image_size = args.shards, 32
        if args.photos:
            shards, image_size = write_photos(Path(scratch), args.photos), 224
        elif shards is None:
            from mmalign.demo.data import make_demo

            make_demo(Path(scratch), variants=1)
            shards = str(Path(scratch) / "digits" / "train-{000000..000007}.tar")
        make = loaders(shards, image_size, args)
        fast = half_epoch_position(make)
        replay = {key: value for key, value in fast.items() if key != "mark"}
        times: dict[str, list[float]] = {"replay": [], "fast": []}
        for _ in range(args.repeats):
            seconds, replayed = resume(make, replay)
            times["replay"].append(seconds)
            seconds, skipped = resume(make, fast)
            times["fast"].append(seconds)
            if replayed != skipped:
                raise RuntimeError("the two resumes continue with different batches")
        before, after = (statistics.median(times[name]) for name in ("replay", "fast"))
        what = f"{args.photos} photos at 224 px" if args.photos else "digits at 32 px"
        print(
            f"{what}: resume at batch {fast['batches']} of epoch 0 (workers {args.workers}, "
            f"shuffle buffer {args.shuffle_buffer})"
        )
        print("| replay s (before) | fast s (after) | speed-up |")
        print("|---|---|---|")
        print(f"| {before:.2f} | {after:.2f} | {before / after:.1f}x |")


if __name__ == "__main__":
    main()
