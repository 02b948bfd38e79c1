"""Hard negatives: NV-Retriever's positive-aware mining (planted duplicates are never chosen,
negatives come ranked by similarity) and neighbour shards from k-means clusters."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import webdataset as wds

from mmalign.cli.main import main
from mmalign.data.exports import load_embeddings
from mmalign.errors import UserError
from mmalign.export import export_embeddings
from mmalign.prep.group_shards import cluster_order
from mmalign.prep.mine_negatives import positive_aware_negatives
from tests.eval.test_zeroshot import tabular, tiny_model, vectors, write_shards


def _unit(rows, dim, seed):
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(queries, candidates, groups, k, ratio, scores=False):
    """Brute force in float64 over every candidate: rows (or their similarities)."""
    q, c = queries.astype(np.float64), candidates.astype(np.float64)
    chosen = []
    for i in range(len(q)):
        positive = q[i] @ c[i]
        limit = positive - (1 - ratio) * abs(positive)
        scored = [
            (float(q[i] @ c[j]), j)
            for j in range(len(c))
            if j != i and groups[j] != groups[i] and q[i] @ c[j] < limit
        ]
        best = sorted(scored, key=lambda item: (-item[0], item[1]))[:k]
        chosen.append([score if scores else j for score, j in best])
    return chosen


def test_positive_aware_filter_skips_duplicates_and_same_group_and_ranks():
    rows = 60
    queries, candidates = _unit(rows, 8, 0), _unit(rows, 8, 1)
    candidates = 0.6 * queries + 0.4 * candidates  # positives are similar
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    duplicates = {3: 17, 17: 3, 25: 40, 40: 25}
    for row, twin in [(3, 17), (25, 40)]:
        candidates[twin] = candidates[row]  # planted exact duplicates
    candidates[50] = candidates[8] + 1e-4  # a near-duplicate of record 8's candidate
    groups = np.arange(rows)
    groups[[10, 11, 12]] = 99  # one group of three
    mined = positive_aware_negatives(queries, candidates, groups, k=5, max_ratio=0.95)
    expected = _reference(queries, candidates, groups, 5, 0.95)
    assert [[row for row, _ in found] for found in mined] == expected
    for query, found in enumerate(mined):
        assert len(found) == 5
        similarities = [score for _, score in found]
        assert similarities == sorted(similarities, reverse=True)
        chosen = {row for row, _ in found}
        assert query not in chosen and duplicates.get(query) not in chosen
        assert not (query in (10, 11, 12) and chosen & {10, 11, 12})
    assert 50 not in {row for row, _ in mined[8]}
    # a ratio of 1 still drops exact duplicates (they tie with the positive)
    loose = positive_aware_negatives(queries, candidates, groups, k=5, max_ratio=1.0)
    assert all(duplicates.get(q) not in {row for row, _ in found} for q, found in enumerate(loose))


def test_deeper_search_when_the_first_neighbours_are_filtered():
    rows = 100
    queries, candidates = _unit(rows, 4, 2), _unit(rows, 4, 3)
    candidates[0] = queries[0]
    candidates[1:60] = candidates[0]  # 59 duplicates of row 0's positive: more than one search
    found = positive_aware_negatives(queries, candidates, np.arange(rows), k=3, max_ratio=0.95)
    assert len(found[0]) == 3 and all(row >= 60 for row, _ in found[0])
    expected = _reference(queries, candidates, np.arange(rows), 3, 0.95, scores=True)
    for item, reference in zip(found, expected, strict=True):  # ties among the 60 copies
        np.testing.assert_allclose([score for _, score in item], reference, rtol=1e-5, atol=1e-6)
    only_duplicates = positive_aware_negatives(
        queries[:60], candidates[:60], np.arange(60), 3, 0.95
    )
    assert only_duplicates[0] == []  # nothing below the cap: no negative rather than a false one


def test_cluster_order_keeps_planted_clusters_together():
    rng = np.random.default_rng(0)
    centres = _unit(4, 16, 5) * 10
    labels = rng.integers(0, 4, size=80)
    points = centres[labels] + rng.normal(size=(80, 16)).astype(np.float32)
    order, assignment = cluster_order(points.astype(np.float32), 4, seed=1)
    assert sorted(order.tolist()) == list(range(80))
    runs = [
        assignment[i]
        for k, i in enumerate(order)
        if k == 0 or assignment[order[k - 1]] != assignment[i]
    ]
    assert len(runs) == 4  # each cluster is one contiguous run
    for cluster in range(4):
        assert len(set(labels[assignment == cluster])) == 1  # and is a planted cluster
    with pytest.raises(UserError, match="--clusters"):
        cluster_order(points[:3].astype(np.float32), 4)


def _export(tmp_path, duplicate_pairs):
    xs, ys = vectors(30, 3, seed=1), vectors(30, 3, seed=2)
    for row, twin in duplicate_pairs:
        ys[twin] = ys[row]
    records = [
        {"__key__": f"k{i:03d}", "x.npy": xs[i], "y.npy": ys[i], "cls": i % 3} for i in range(30)
    ]
    records[7].pop("y.npy")  # a record without the candidate modality
    shard = write_shards(tmp_path / "src" / "d-000000.tar", records)
    model = tiny_model("clip", {"x": tabular(3), "y": tabular(3)})
    out = tmp_path / "emb"
    export_embeddings(
        model,
        shard,
        ["x", "y"],
        out,
        fields={"x": "x.npy", "y": "y.npy"},
        metadata_fields=["cls"],
        batch_size=8,
        progress=False,
    )
    return out, records


def _read(pattern):
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_mine_negatives_command_copies_ranked_negatives(tmp_path):
    pairs = [(2, 11), (5, 20)]
    export, records = _export(tmp_path, pairs)
    status = main(
        [
            "prep",
            "mine-negatives",
            "--embeddings",
            str(export),
            "--query",
            "x",
            "--candidates",
            "y",
            "--k",
            "3",
            "--max-ratio",
            "0.95",
            "--out",
            str(tmp_path / "mined"),
        ]
    )
    assert status == 0
    written = _read(str(tmp_path / "mined" / "data-000000.tar"))
    assert [sample["__key__"] for sample in written] == [r["__key__"] for r in records]
    source = {r["__key__"]: r for r in records}
    twins = {f"k{a:03d}": f"k{b:03d}" for a, b in pairs} | {
        f"k{b:03d}": f"k{a:03d}" for a, b in pairs
    }
    x, y = (load_embeddings(export, m)[0].astype(np.float32) for m in ("x", "y"))
    total = 0
    for index, sample in enumerate(written):
        key = sample["__key__"]
        assert np.array_equal(np.load(io.BytesIO(sample["x.npy"])), source[key]["x.npy"])
        if "y.npy" not in source[key]:
            assert "negatives.json" not in sample
            continue
        listed = json.loads(sample["negatives.json"])
        assert len(listed) <= 3  # fewer when few candidates lie under the cap
        total += len(listed)
        scores = [entry["similarity"] for entry in listed]
        assert scores == sorted(scores, reverse=True)
        positive = float(x[index] @ y[index])
        for position, entry in enumerate(listed):
            assert entry["key"] not in (key, twins.get(key), "k007")
            payload = np.load(io.BytesIO(sample[f"neg{position}.y.npy"]))
            assert np.array_equal(payload, source[entry["key"]]["y.npy"])
            assert entry["similarity"] < positive - 0.05 * abs(positive) + 1e-5
    assert total >= 40


def test_mine_negatives_respects_the_group_field(tmp_path):
    export, _ = _export(tmp_path, [])
    main(
        [
            "prep",
            "mine-negatives",
            "--embeddings",
            str(export),
            "--query",
            "x",
            "--candidates",
            "y",
            "--k",
            "4",
            "--group-field",
            "cls",
            "--out",
            str(tmp_path / "mined"),
        ]
    )
    for sample in _read(str(tmp_path / "mined" / "data-000000.tar")):
        group = int(sample["cls"])
        for entry in json.loads(sample.get("negatives.json", b"[]")):
            assert int(entry["key"][1:]) % 3 != group


def test_group_shards_command_writes_clusters_contiguously(tmp_path):
    export, records = _export(tmp_path, [])
    out = tmp_path / "grouped"
    assert (
        main(
            [
                "prep",
                "group-shards",
                "--embeddings",
                str(export),
                "--modality",
                "y",
                "--clusters",
                "3",
                "--out",
                str(out),
                "--maxcount",
                "7",
            ]
        )
        == 0
    )
    written = [s for shard in sorted(out.glob("data-*.tar")) for s in _read(str(shard))]
    y, table = load_embeddings(export, "y")
    keys = table.column("key").to_pylist()
    present = ~np.isnan(y).any(axis=1)
    order, assignment = cluster_order(y[present].astype(np.float32), 3, seed=0)
    expected = [keys[i] for i in np.flatnonzero(present)[order]] + ["k007"]
    assert [sample["__key__"] for sample in written] == expected
    clusters = assignment[order].tolist()
    assert sum(a != b for a, b in itertools.pairwise(clusters)) == 2
    source = {r["__key__"]: r for r in records}
    for sample in written:
        assert np.array_equal(
            np.load(io.BytesIO(sample["x.npy"])), source[sample["__key__"]]["x.npy"]
        )
    assert json.loads((out / "summary.json").read_text())["records"] == 30
