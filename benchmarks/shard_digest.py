"""What the source-shard digests cost an export: ``settings.source_shards`` records a BLAKE2b
digest of each local shard (:func:`mmalign.data.exports.shard_stamps`), read once more when
the export starts (the prep tools that reread the shards compare it).

On the demo's ``digits`` data (``make-demo --variants V``: train, val and test shards) and the
demo model (``demo_digits.yaml``'s towers, untrained: the time is what matters), per repeat:

- the whole ``export_embeddings`` of all four modalities (digests included),
- ``shard_stamps`` as it is now (size, mtime and digest) and the old stamps (``os.stat``
  only), interleaved in the same process;

and reports the digest time as a share of the export's. A memory limit (``--memory-gib``) is
set first.

Run (CPU, about a minute with ``--variants 1``):

    .venv/bin/python benchmarks/shard_digest.py --variants 1 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from mmalign.data.exports import shard_stamps
from mmalign.demo.data import make_demo
from mmalign.export import export_embeddings
from mmalign.model import AlignmentModel


def old_stamps(shards: list[str]) -> dict[str, list[int]]:
    """The stamps before digests: size and modification time."""
    return {path: [os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in shards}


def timed(function: Callable[..., object], *args: object) -> float:
    """Wall seconds of ``function(*args)``."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=8.0)
    args = parser.parse_args()
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    config_file = resources.files("mmalign.demo") / "configs" / "demo_digits.yaml"
    config = yaml.safe_load(config_file.read_text())
    model = AlignmentModel.from_config(config["model"]).eval()
    modalities = list(config["model"]["towers"])
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo(Path(tmp), variants=args.variants, progress=False)["digits"]
        shards = sorted(str(path) for path in data.glob("*.tar"))
        size = sum(os.path.getsize(path) for path in shards)
        exports, digests, stats = [], [], []
        for repeat in range(args.repeats):
            export = functools.partial(
                export_embeddings,
                model,
                shards,
                modalities,
                Path(tmp) / f"emb{repeat}",
                batch_size=256,
                fields=config["data"]["fields"],
                progress=False,
            )
            exports.append(timed(export))
            digests.append(timed(shard_stamps, shards))
            stats.append(timed(old_stamps, shards))
    export, digest, stat = (statistics.median(values) for values in (exports, digests, stats))
    print(f"shards: {len(shards)}, {size / 2**20:.1f} MiB; repeats: {args.repeats} (medians)")
    print("| export (s) | stamps with digests (s) | size+mtime only (s) | digest MiB/s | share |")
    print("|---|---|---|---|---|")
    share = 100 * (digest - stat) / (export - digest + stat)
    print(
        f"| {export:.2f} | {digest:.3f} | {stat:.5f} | {size / 2**20 / digest:.0f} "
        f"| +{share:.1f}% |"
    )


if __name__ == "__main__":
    main()
