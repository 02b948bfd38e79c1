"""``mmalign prep mine-negatives``: hard negatives with NV-Retriever's positive-aware filter.

For every record with both modalities of a finished export, the query (``--query M1``) is
searched against every record's candidate (``--candidates M2``, FAISS inner product, exact),
and up to ``k`` of the most similar candidates are kept, in decreasing similarity, leaving out:

* the record's own candidate (its positive);
* any candidate whose similarity is not below the positive's by at least
  ``(1 - max_ratio) * |positive's|`` (likely a false negative: a duplicate or a paraphrase);
  for a positive similarity above zero that is ``max_ratio`` times the positive's;
* any candidate of the same group (``--group-field``, a metadata column of the export).

The source records are rewritten with the negatives' payloads copied in as ``neg0.<ext>``,
``neg1.<ext>`` ... (the candidate modality's extension) and ``negatives.json`` (their keys
and similarities), in the export's order.

Example:
    >>> mine_negatives("emb", "image", "text", k=4, max_ratio=0.95, out="mined")  # doctest: +SKIP
    {'records': 180, 'negatives': 720, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.errors import UserError
from mmalign.extras import missing_extra
from mmalign.prep.reshard import (
    ExportRows,
    check_maxcount,
    find_payload,
    prep_output,
    record_extensions,
    source_records,
    source_shards,
    write_shards,
    write_summary,
)

try:
    import faiss
except ImportError:
    raise missing_extra("index", "mmalign prep mine-negatives") from None


def positive_aware_negatives(
    queries: np.ndarray,
    candidates: np.ndarray,
    groups: np.ndarray,
    k: int,
    max_ratio: float,
    candidate_rows: np.ndarray | None = None,
) -> list[list[tuple[int, float]]]:
    """For each query row ``i`` (whose positive is candidate ``i``), up to ``k`` candidate
    rows ``(row, similarity)`` in decreasing similarity, filtered as the module says.
    ``candidate_rows`` restricts the candidates (rows that have the modality).

    Example:
        >>> q = np.eye(3, dtype=np.float32)
        >>> c = np.array([[1, 0, 0], [0.9, 0.4, 0], [0.5, 0, 0.8]], dtype=np.float32)
        >>> positive_aware_negatives(q, c, np.arange(3), k=2, max_ratio=0.95)[0]
        [(1, 0.8999999761581421), (2, 0.5)]
    """
    rows = queries.shape[0]
    allowed = np.arange(rows) if candidate_rows is None else np.asarray(candidate_rows)
    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(np.ascontiguousarray(candidates[allowed], dtype=np.float32))
    positives = (queries * candidates).sum(axis=1)
    limits = positives - (1.0 - max_ratio) * np.abs(positives)
    result: list[list[tuple[int, float]]] = [[] for _ in range(rows)]
    pending = np.arange(rows)
    depth = min(len(allowed), 4 * k + 16)
    while len(pending):
        _, found = index.search(np.ascontiguousarray(queries[pending]), depth)
        unfinished = []
        for query, row_found in zip(pending, found):
            found_rows = allowed[row_found[row_found >= 0]]
            # rescored exactly as the positive was, so a duplicate ties with it bit for bit
            scores = (queries[query] * candidates[found_rows]).sum(axis=1)
            keep = (found_rows != query) & (groups[found_rows] != groups[query])
            keep &= scores < limits[query]
            kept_rows, kept_scores = found_rows[keep], scores[keep]
            ranked = np.lexsort((kept_rows, -kept_scores))[:k]  # ties: lower row first
            result[query] = [(int(kept_rows[i]), float(kept_scores[i])) for i in ranked]
            if len(ranked) < k and depth < len(allowed):
                unfinished.append(query)
        pending = np.array(unfinished, dtype=np.int64)
        depth = min(len(allowed), depth * 4)
    return result


def mine_negatives(
    export_dir: str | Path,
    query: str,
    candidates: str,
    k: int,
    max_ratio: float,
    out: str | Path,
    *,
    group_field: str | None = None,
    name: str = "data",
    maxcount: int = 10000,
) -> dict[str, Any]:
    """Write the shards with mined negatives and ``OUT/summary.json``; returns the summary."""
    if k < 1 or not 0 < max_ratio <= 1:
        raise UserError(
            f"k {k} or max_ratio {max_ratio} out of range (--k, --max-ratio); pass k >= 1 and "
            "max_ratio in (0, 1]"
        )
    check_maxcount(maxcount)
    query_rows = ExportRows.load(export_dir, query)
    candidate_rows = ExportRows.load(export_dir, candidates)
    groups = query_rows.groups(group_field)
    extensions = record_extensions(export_dir, candidates)
    mined = positive_aware_negatives(
        query_rows.vectors,
        candidate_rows.vectors,
        groups,
        k,
        max_ratio,
        candidate_rows=np.flatnonzero(candidate_rows.present),
    )
    keys = query_rows.keys
    records = source_records(export_dir, keys)
    both = query_rows.present & candidate_rows.present

    def with_negatives(row: int) -> dict[str, Any]:
        record = dict(records[keys[row]])
        if not both[row]:
            return record
        listed = []
        for position, (negative, similarity) in enumerate(mined[row]):
            payload = find_payload(records.get(keys[negative], {}), extensions)
            if payload is not None:
                record[f"neg{position}.{payload[0]}"] = payload[1]
                listed.append({"key": keys[negative], "similarity": round(similarity, 6)})
        record["negatives.json"] = json.dumps(listed).encode()
        return record

    order = [row for row, key in enumerate(keys) if key in records]
    written = (with_negatives(row) for row in order)
    owner = prep_output("mine-negatives", name)
    sources = source_shards(export_dir)
    shards = write_shards(written, out, owner, name, maxcount, len(order), sources)
    counts = [len(mined[row]) for row in order if both[row]]
    summary = {
        "export": str(export_dir),
        "query": query,
        "candidates": candidates,
        "k": k,
        "max_ratio": max_ratio,
        "group_field": group_field,
        "records": len(order),
        "negatives": int(sum(counts)),
        "queries_with_fewer_than_k": int(sum(count < k for count in counts)),
        "shards": shards,
    }
    return write_summary(out, summary, owner)
