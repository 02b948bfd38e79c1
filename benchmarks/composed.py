"""Composed-query benchmark on digits-sum: caption ``a`` + tone ``b`` retrieve images of
``(a + b) mod 10``.

The digits-sum test images are exported and indexed (flat) with each model; 100 test records
(seeded) give the query pairs: their caption (names ``a``) and tone (keys ``b``), searched
together with :func:`mmalign.export.search` (``{"text": ..., "audio": ...}``). Precision@5 is
the share of the 5 best images (the record's own image left out) that show the record's
digit ``(a + b) mod 10``. A Symile model scores by the multilinear inner product, so only the
triple carries the answer; a CLIP model sums pairwise similarities, and every pair of
modalities is independent in this data (chance: 10%).

Run (CPU; the digits-sum models of ``mmalign demo``):

    .venv/bin/python benchmarks/composed.py --data data/demo/digits-sum \\
        --model symile=runs/demo/digits-sum-symile/model \\
        --model clip=runs/demo/digits-sum-clip/model
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from mmalign.data.records import iterate_records
from mmalign.export import build_index, export_embeddings, search

FIELDS = {"image": "png", "text": "txt", "audio": "flac"}


def precision_at_5(model_dir: str, data: Path, pairs: int, seed: int) -> dict[str, float]:
    """Precision@5 of ``pairs`` caption + tone queries against the exported test images."""
    test = str(data / "test-000000.tar")
    records = list(iterate_records(test, {"text": "txt", "audio": "flac", "cls": "cls"}))
    chosen = np.random.default_rng(seed).choice(len(records), size=pairs, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        export_embeddings(
            model_dir, test, ["image"], tmp, fields=FIELDS, metadata_fields=["cls"], progress=False
        )
        build_index(tmp, "image", "flat")
        hits = []
        for row in chosen:
            record = records[row]
            query = {"text": record["text"], "audio": record["audio"]}
            found = search(tmp, model_dir, query, k=6)
            top = [r for r in found if r["key"] != record["__key__"]][:5]
            hits.append(np.mean([int(r["cls"]) == int(record["cls"]) for r in top]))
    return {"precision@5": float(np.mean(hits)), "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo/digits-sum"))
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| model | query pairs | precision@5 (chance 10%) |")
    print("|---|---|---|")
    for item in args.model:
        name, _, directory = item.partition("=")
        result = precision_at_5(directory, args.data, args.pairs, args.seed)
        print(f"| {name} | {result['pairs']} | {result['precision@5']:.1%} |", flush=True)
        print(json.dumps({name: result}))


if __name__ == "__main__":
    main()
