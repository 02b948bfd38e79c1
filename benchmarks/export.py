"""Export and search benchmark: pipeline overhead of ``export_embeddings`` and FAISS indexes.

1. Export throughput: ``export_embeddings`` (shards read, decoded, embedded, written as
   chunks + Parquet + manifest) against the bare ``model.encode`` loop on the same texts
   (already in memory). The overhead is the extra wall time of the export, in percent.
2. Search: ``build_index`` / ``load_index`` on N random unit vectors (d = 128), IVF and HNSW
   against the exact (flat) index: latency per query (batched search of the queries) and
   recall@10 (overlap of the top 10 with the exact top 10).

Run (CPU, a few minutes):

    .venv/bin/python benchmarks/export.py --samples 2048 --repeats 2 --vectors 100000 --queries 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds

from mmalign.export import build_index, export_embeddings, load_index
from mmalign.model import AlignmentModel

TEXT_MODEL = {
    "dim": 128,
    "towers": {
        "text": {"type": "text", "width": 256, "heads": 4, "layers": 4, "context_length": 32}
    },
}


def sentences(count: int) -> list[str]:
    generator = np.random.default_rng(0)
    words = ["the", "digit", "seven", "handwritten", "tone", "a", "graph", "of", "three", "nine"]
    return [
        " ".join(generator.choice(words, size=int(generator.integers(4, 12)))) for _ in range(count)
    ]


def write_text_shards(directory: Path, texts: list[str], per_shard: int = 1024) -> list[str]:
    shards = []
    for start in range(0, len(texts), per_shard):
        path = directory / f"bench-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as writer:
            for i in range(start, min(start + per_shard, len(texts))):
                writer.write({"__key__": f"s{i:08d}", "txt": texts[i]})
        shards.append(str(path))
    return shards


def bench_export(samples: int, batch_size: int, repeats: int, workers: int) -> dict[str, float]:
    model = AlignmentModel.from_config(TEXT_MODEL).eval()
    texts = sentences(samples)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_text_shards(Path(tmp), texts)
        model.encode("text", texts[:batch_size], batch_size=batch_size)  # warm-up
        bare, exported = [], []
        for repeat in range(repeats):
            start = time.perf_counter()
            model.encode("text", texts, batch_size=batch_size)
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            export_embeddings(
                model,
                shards,
                ["text"],
                Path(tmp) / f"out{repeat}",
                batch_size=batch_size,
                chunk_size=4096,
                fields={"text": "txt"},
                workers=workers,
                progress=False,
            )
            exported.append(time.perf_counter() - start)
    best_bare, best_export = min(bare), min(exported)
    return {
        "samples": samples,
        "encode_samples_per_s": samples / best_bare,
        "export_samples_per_s": samples / best_export,
        "overhead_percent": 100 * (best_export / best_bare - 1),
    }


def write_vectors_as_export(directory: Path, vectors: np.ndarray) -> None:
    """A finished one-chunk export of ``vectors`` (modality ``v``), as export_embeddings writes."""
    rows, dim = vectors.shape
    (directory / "v").mkdir(parents=True)
    (directory / "meta").mkdir()
    np.save(directory / "v" / "chunk-000000.npy", vectors)
    table = pa.table({"key": [f"v{i}" for i in range(rows)], "present_v": [True] * rows})
    pq.write_table(table, directory / "meta" / "chunk-000000.parquet")
    files = {"v": "v/chunk-000000.npy", "meta": "meta/chunk-000000.parquet"}
    manifest = {
        "settings": {"modalities": ["v"], "dim": dim},
        "complete": True,
        "chunks": [{"name": "chunk-000000", "rows": rows, "files": files}],
        "rows": rows,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def timed_search(index: object, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, (time.perf_counter() - start) / len(queries)


def bench_search(vectors: int, queries: int, dim: int = 128, k: int = 10) -> list[dict]:
    generator = np.random.default_rng(0)
    data = generator.normal(size=(vectors, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    query = generator.normal(size=(queries, dim)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    settings = [
        ("flat", {}, {}),
        ("ivf", {"nprobe": 8}, {"nprobe": 8}),
        ("ivf", {"nprobe": 32}, {"nprobe": 32}),
        ("hnsw", {"m": 32, "ef_search": 64}, {"efSearch": 64}),
        ("hnsw", {"m": 32, "ef_search": 128}, {"efSearch": 128}),
    ]
    results, exact = [], None
    with tempfile.TemporaryDirectory() as tmp:
        write_vectors_as_export(Path(tmp), data)
        for kind, options, shown in settings:
            start = time.perf_counter()
            build_index(tmp, "v", kind, **options)
            built = time.perf_counter() - start
            index = load_index(tmp, "v")
            rows, latency = timed_search(index.index, query, k)
            exact = rows if exact is None else exact
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, exact)])
            params = dict(shown, **({"nlist": index.info["nlist"]} if kind == "ivf" else {}))
            results.append(
                {
                    "index": kind,
                    "params": params,
                    "build_s": built,
                    "latency_ms": 1000 * latency,
                    "recall@10": float(recall),
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="export data-loader workers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="export,search", help="comma-separated parts to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "export" in parts:
        export = bench_export(args.samples, args.batch_size, args.repeats, args.workers)
        print(
            f"| samples | encode loop (samples/s) | export, {args.workers} workers (samples/s) "
            "| overhead |"
        )
        print("|---|---|---|---|")
        print(
            f"| {export['samples']} | {export['encode_samples_per_s']:.0f} | "
            f"{export['export_samples_per_s']:.0f} | {export['overhead_percent']:+.1f}% |"
        )
        print()
    if "search" not in parts:
        return
    print(
        f"| index ({args.vectors} x 128, {args.queries} queries) | parameters | build (s) | "
        "latency (ms/query) | recall@10 |"
    )
    print("|---|---|---|---|---|")
    for row in bench_search(args.vectors, args.queries):
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "exact"
        print(
            f"| {row['index']} | {params} | {row['build_s']:.2f} | {row['latency_ms']:.3f} | "
            f"{row['recall@10']:.3f} |"
        )


if __name__ == "__main__":
    main()
