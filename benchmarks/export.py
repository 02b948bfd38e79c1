"""Export and search benchmark: pipeline overhead of ``export_embeddings`` and FAISS indexes.

1. Export throughput: ``export_embeddings`` (shards read, decoded, embedded, written as
   chunks + Parquet + manifest) against the bare ``model.encode`` loop on the same texts
   (already in memory). The overhead is the extra wall time of the export, in percent.
2. Search on real embeddings: the digits train images embedded by a trained demo model
   (``benchmarks/matryoshka.py``'s Matryoshka run) ``--copies`` times (the first plain, the
   others with the tower's train-time augmentation: 5,028 x 20 = 100,560 vectors), the 1,440
   test images as queries. Per Matryoshka prefix and index kind (``build_index(kind, dim)``):
   build time, bytes per vector on disk, latency per query (batched search), recall@10
   against exact search at full dim, and class-level precision@10 (share of the 10 results
   showing the query's digit).

Run (CPU, several minutes; after ``benchmarks/matryoshka.py``):

    .venv/bin/python benchmarks/export.py --parts search --copies 20
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

from mmalign.data.records import iterate_records
from mmalign.embeddings import truncate
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


def write_vectors_as_export(
    directory: Path, vectors: np.ndarray, labels: np.ndarray, matryoshka: list[int] | None
) -> None:
    """A finished one-chunk export of ``vectors`` (modality ``v``, class in ``cls``)."""
    rows, dim = vectors.shape
    (directory / "v").mkdir(parents=True)
    (directory / "meta").mkdir()
    np.save(directory / "v" / "chunk-000000.npy", vectors)
    table = {"key": [f"v{i}" for i in range(rows)], "present_v": [True] * rows, "cls": labels}
    pq.write_table(pa.table(table), directory / "meta" / "chunk-000000.parquet")
    files = {"v": "v/chunk-000000.npy", "meta": "meta/chunk-000000.parquet"}
    manifest = {
        "settings": {"modalities": ["v"], "dim": dim, "matryoshka": matryoshka},
        "complete": True,
        "chunks": [{"name": "chunk-000000", "rows": rows, "files": files}],
        "rows": rows,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


@torch.no_grad()
def embed_images(model: AlignmentModel, images: list, augment: bool) -> torch.Tensor:
    """Full-size image embeddings; ``augment`` applies the tower's train-time transform."""
    tower = model.tower("image")
    chunks = []
    for start in range(0, len(images), 512):
        items = [tower.preprocess(image, augment) for image in images[start : start + 512]]
        chunks.append(model.embed("image", tower.collate(items)))
    return torch.cat(chunks)


def real_embeddings(model_dir: Path, data: Path, copies: int) -> dict[str, np.ndarray]:
    """Gallery: the digits train images, ``copies`` times (the first plain, the others
    augmented); queries: the test images. Embedded by the trained model's image tower."""
    model = AlignmentModel.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    fields = {"image": "png", "cls": "cls"}
    split = {
        name: list(iterate_records(str(data / "digits" / pattern), fields))
        for name, pattern in (("train", "train-{000000..000007}.tar"), ("test", "test-000000.tar"))
    }
    train_images = [record["image"] for record in split["train"]]
    gallery = [embed_images(model, train_images, augment=copy > 0) for copy in range(copies)]
    train_labels = np.array([int(record["cls"]) for record in split["train"]])
    return {
        "gallery": torch.cat(gallery).numpy(),
        "gallery_labels": np.tile(train_labels, copies),
        "queries": embed_images(model, [r["image"] for r in split["test"]], False).numpy(),
        "query_labels": np.array([int(record["cls"]) for record in split["test"]]),
        "matryoshka": model.config.matryoshka,
    }


def timed_search(index: object, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, (time.perf_counter() - start) / len(queries)


KINDS = {
    "flat": {},
    "sq8": {},
    "ivf": {"nlist": 1024, "nprobe": 16},
    "ivfpq": {"nlist": 1024, "nprobe": 16},
    "hnsw": {"m": 32, "ef_search": 64},
}


def bench_search(
    embedded: dict[str, np.ndarray], prefixes: list[int], kinds: list[str], k: int = 10
) -> list[dict]:
    """Per prefix and index kind: build time, bytes per vector, latency, recall@k against
    exact search at full size, class-level precision@k."""
    gallery, queries = embedded["gallery"], embedded["queries"]
    exact = faiss.IndexFlatIP(gallery.shape[1])
    exact.add(gallery)
    _, exact_rows = exact.search(queries, k)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_vectors_as_export(
            Path(tmp), gallery, embedded["gallery_labels"], embedded["matryoshka"]
        )
        for dim in prefixes:
            truncated = truncate(torch.from_numpy(queries), dim).numpy()
            for kind in kinds:
                start = time.perf_counter()
                build_index(tmp, "v", kind, dim=dim, **KINDS[kind])
                built = time.perf_counter() - start
                index = load_index(tmp, "v")
                rows, latency = timed_search(index.index, truncated, k)
                recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, exact_rows)])
                found = embedded["gallery_labels"][rows]
                precision = (found == embedded["query_labels"][:, None]).mean()
                results.append(
                    {
                        "dim": dim,
                        "index": kind,
                        "params": {
                            **KINDS[kind],
                            **({"pq_m": index.info["pq_m"]} if kind == "ivfpq" else {}),
                        },
                        "build_s": built,
                        "bytes_per_vector": index.info["bytes_per_vector"],
                        "latency_ms": 1000 * latency,
                        "recall@10": float(recall),
                        "precision@10": float(precision),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=Path("runs/bench_mrl/matryoshka/model"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--copies", type=int, default=20, help="gallery: train images x copies")
    parser.add_argument("--prefixes", default="16,32,64,128")
    parser.add_argument("--kinds", default=",".join(KINDS))
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
    embedded = real_embeddings(args.model, args.data, args.copies)
    rows, queries = embedded["gallery"].shape[0], embedded["queries"].shape[0]
    print(
        f"| dim | index ({rows} digit images, {queries} test queries) | parameters | build (s) "
        "| bytes/vector | latency (ms/query) | recall@10 vs exact at full dim | class P@10 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    prefixes = [int(p) for p in args.prefixes.split(",")]
    for row in bench_search(embedded, prefixes, args.kinds.split(",")):
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "exact"
        print(
            f"| {row['dim']} | {row['index']} | {params} | {row['build_s']:.2f} | "
            f"{row['bytes_per_vector']:.1f} | {row['latency_ms']:.3f} | {row['recall@10']:.3f} | "
            f"{row['precision@10']:.3f} |"
        )


if __name__ == "__main__":
    main()
