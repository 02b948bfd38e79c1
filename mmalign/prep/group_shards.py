"""``mmalign prep group-shards``: neighbour batches. Cluster one modality of a finished export
with FAISS k-means and rewrite its source records so that consecutive records come from one
cluster (G-SimCLR's guided batches, reversed: neighbours together, for harder in-batch
negatives). With ``data.shuffle_buffer`` smaller than a cluster, a batch then holds
neighbours; the loss is unchanged.

Clusters are written in a seeded random order, records within a cluster in export order;
records without the modality come last. ``OUT/summary.json`` holds the cluster sizes.

Example:
    >>> group_shards("emb", "image", clusters=16, out="neighbours")["clusters"]  # doctest: +SKIP
    16
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmalign.errors import UserError
from mmalign.extras import missing_extra
from mmalign.prep.reshard import (
    ExportRows,
    check_maxcount,
    prep_output,
    source_records,
    source_shards,
    write_shards,
    write_summary,
)

try:
    import faiss
except ImportError:
    raise missing_extra("index", "mmalign prep group-shards") from None


def cluster_order(
    vectors: np.ndarray, clusters: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of ``vectors``: (row order with clusters contiguous, cluster of each row).

    Example:
        >>> points = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], dtype=np.float32)
        >>> order, assignment = cluster_order(points, 2)
        >>> assignment[order].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
        True
    """
    rows, dim = vectors.shape
    if not 1 <= clusters <= rows:
        raise UserError(
            f"{clusters} clusters for {rows} rows (--clusters); pick between 1 and {rows}"
        )
    kmeans = faiss.Kmeans(
        dim,
        clusters,
        niter=25,
        nredo=5,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assignment = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    assignment = assignment[:, 0]
    rank = np.random.default_rng(seed).permutation(clusters)
    order = np.lexsort((np.arange(rows), rank[assignment]))
    return order, assignment


def group_shards(
    export_dir: str | Path,
    modality: str,
    clusters: int,
    out: str | Path,
    *,
    name: str = "data",
    maxcount: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the neighbour-ordered shards and ``OUT/summary.json``; returns the summary."""
    check_maxcount(maxcount)
    rows = ExportRows.load(export_dir, modality)
    present = np.flatnonzero(rows.present)
    order, assignment = cluster_order(rows.vectors[present], clusters, seed)
    ordered = [rows.keys[i] for i in present[order]]
    ordered += [key for key, has in zip(rows.keys, rows.present) if not has]
    records = source_records(export_dir, ordered)
    kept = [key for key in ordered if key in records]
    sources = source_shards(export_dir)
    owner = prep_output("group-shards", name)
    shards = write_shards(
        (records[key] for key in kept), out, owner, name, maxcount, len(kept), sources
    )
    sizes = np.bincount(assignment, minlength=clusters)
    summary = {
        "export": str(export_dir),
        "modality": modality,
        "clusters": clusters,
        "records": sum(key in records for key in ordered),
        "without_modality": int((~rows.present).sum()),
        "cluster_sizes": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        },
        "shards": shards,
    }
    return write_summary(out, summary, owner)
