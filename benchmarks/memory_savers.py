"""One training step of the open_clip ViT-B-32 towers of configs/clip_vit_b32.yaml (random
init) with the memory savers: peak RSS and seconds per step, one setting per process.

    python benchmarks/memory_savers.py --batch 8 --steps 3 [--checkpointing] [--compile]

Prints one JSON line: the setting, peak RSS (MiB, ``ru_maxrss``) and the median seconds of the
steps after the first (the first one compiles under ``--compile``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from mmalign.config import TrainConfig, load_config
from mmalign.model import AlignmentModel
from mmalign.training.memory_savers import apply_memory_savers
from mmalign.training.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AlignmentModel.from_config(load_config("configs/clip_vit_b32.yaml").model).train()
    train = TrainConfig(gradient_checkpointing=args.checkpointing, compile=args.compile)
    apply_memory_savers(model, train)
    optimizer = build_optimizer(model, train)
    images = torch.randn(args.batch, 3, 224, 224)
    texts = torch.randint(1, 49407, (args.batch, 77))
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model.loss(model({"image": images, "text": texts})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "checkpointing": args.checkpointing,
                "compile": args.compile,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "first_step_s": round(seconds[0], 2),
                "step_s": round(statistics.median(seconds[1:] or seconds), 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
