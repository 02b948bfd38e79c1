"""Retrieval, diagnostics and classification metrics against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from mmalign.eval.classification import (
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    topk_accuracy,
)
from mmalign.eval.diagnostics import embedding_diagnostics
from mmalign.eval.retrieval import nway_retrieval_metrics, recall_curve, retrieval_metrics


def brute_force_direction(queries, gallery, query_ids, gallery_ids, ks):
    """Per-query Python loops: sort by (-score, relevant) so ties put irrelevant items first."""
    scores = np.asarray(queries, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    first_ranks, precisions = [], []
    for i, row in enumerate(scores):
        relevant = [gallery_ids[j] == query_ids[i] for j in range(len(gallery_ids))]
        if not any(relevant):
            continue
        order = sorted(range(len(row)), key=lambda j: (-row[j], relevant[j]))
        hit_ranks = [r + 1 for r, j in enumerate(order) if relevant[j]]
        first_ranks.append(hit_ranks[0])
        precisions.append(np.mean([(n + 1) / rank for n, rank in enumerate(hit_ranks)]))
    result = {f"R@{k}": np.mean([rank <= k for rank in first_ranks]) for k in ks}
    result["median_rank"] = float(np.median(first_ranks))
    result["mAP"] = float(np.mean(precisions))
    result["queries"] = len(first_ranks)
    return result


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_retrieval_matches_brute_force_with_ties_and_several_relevant(chunk_size):
    generator = torch.Generator().manual_seed(1)
    # small integer entries: many exact score ties, computed exactly in float32 and float64
    queries = torch.randint(-1, 2, (17, 3), generator=generator).float()
    gallery = torch.randint(-1, 2, (29, 3), generator=generator).float()
    query_ids = [f"id{int(v)}" for v in torch.randint(0, 8, (17,), generator=generator)]
    gallery_ids = [f"id{int(v)}" for v in torch.randint(0, 8, (29,), generator=generator)]
    ks = (1, 3, 5)
    metrics = retrieval_metrics(queries, gallery, query_ids, gallery_ids, ks, chunk_size)
    forward = brute_force_direction(queries, gallery, query_ids, gallery_ids, ks)
    backward = brute_force_direction(gallery, queries, gallery_ids, query_ids, ks)
    expected = {f"q2g/{k}": v for k, v in forward.items()}
    expected |= {f"g2q/{k}": v for k, v in backward.items()}
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_ties_are_pessimistic():
    # every score equal: the single relevant item ranks after all irrelevant ones
    queries = torch.ones(4, 2)
    gallery = torch.ones(4, 2)
    metrics = retrieval_metrics(queries, gallery, ks=(1, 4))
    assert metrics["q2g/R@1"] == 0.0
    assert metrics["q2g/R@4"] == 1.0
    assert metrics["q2g/median_rank"] == 4.0
    assert metrics["q2g/mAP"] == pytest.approx(0.25)


def test_map_equals_sklearn_average_precision_without_ties():
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(6, 5, generator=generator)
    gallery = torch.randn(40, 5, generator=generator)
    query_ids = list(range(6))
    gallery_ids = [int(v) for v in torch.randint(0, 6, (40,), generator=generator)]
    scores = (queries.double() @ gallery.double().T).numpy()
    expected = [
        average_precision_score([g == q for g in gallery_ids], scores[q])
        for q in query_ids
        if q in gallery_ids
    ]
    metrics = retrieval_metrics(queries, gallery, query_ids, gallery_ids)
    assert metrics["q2g/mAP"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert metrics["q2g/queries"] == len(expected)


def test_retrieval_needs_ids_when_sizes_differ():
    with pytest.raises(ValueError, match="pass query_ids and gallery_ids"):
        retrieval_metrics(torch.randn(3, 2), torch.randn(4, 2))


def test_nway_retrieval_uses_product_of_the_other_modalities():
    generator = torch.Generator().manual_seed(3)
    embeddings = {m: F.normalize(torch.randn(12, 6, generator=generator), dim=-1) for m in "abc"}
    product = embeddings["a"] * embeddings["b"]
    expected = retrieval_metrics(product, embeddings["c"], ks=(1, 5))
    metrics = nway_retrieval_metrics(embeddings, "c", ks=(1, 5))
    assert metrics == {k.removeprefix("q2g/"): v for k, v in expected.items() if "q2g" in k}


def test_recall_curve_matches_retrieval_metrics():
    generator = torch.Generator().manual_seed(4)
    queries, gallery = (
        torch.randn(30, 4, generator=generator),
        torch.randn(30, 4, generator=generator),
    )
    curve = recall_curve(queries, gallery, max_k=10)
    metrics = retrieval_metrics(queries, gallery, ks=range(1, 11))
    assert curve.tolist() == [metrics[f"q2g/R@{k}"] for k in range(1, 11)]


def test_diagnostics_match_definitions():
    generator = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    y = F.normalize(x + 0.3 * torch.randn(50, 8, generator=generator), dim=-1)
    metrics = embedding_diagnostics({"x": x, "y": y})
    x64, y64 = x.double(), y.double()
    assert metrics["alignment/x-y"] == pytest.approx(float(((x64 - y64) ** 2).sum(1).mean()))
    pair_terms = [
        math.exp(-2 * float(((x64[i] - x64[j]) ** 2).sum())) for i in range(50) for j in range(i)
    ]
    assert metrics["uniformity/x"] == pytest.approx(math.log(np.mean(pair_terms)), rel=1e-9)
    singular = np.linalg.svd(y64.numpy(), compute_uv=False)
    p = singular / singular.sum() + 1e-7
    assert metrics["rank/y"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert metrics["gap/x-y"] == pytest.approx(float((x64.mean(0) - y64.mean(0)).norm()))


def test_diagnostics_effective_rank_and_presence():
    # a rank-2 embedding has effective rank at most 2; absent rows are left out of alignment
    base = torch.zeros(40, 6)
    base[:20, 0] = 1.0
    base[20:, 1] = 1.0
    other = base.clone()
    other[:5] = torch.tensor([0.0, 0, 0, 0, 0, 1])
    present = {"b": torch.arange(40) >= 5}
    metrics = embedding_diagnostics({"a": base, "b": other}, present=present)
    assert metrics["rank/a"] == pytest.approx(2.0, abs=1e-4)
    assert metrics["alignment/a-b"] == 0.0


def test_classification_metrics_by_hand():
    scores = torch.tensor(
        [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6], [0.3, 0.3, 0.4]]
    )
    labels = torch.tensor([0, 1, 2, 2, 1])
    assert topk_accuracy(scores, labels, ks=(1, 2)) == {"top1": 3 / 5, "top2": 4 / 5}
    confusion = confusion_matrix(scores.argmax(1), labels, 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert per_class_accuracy(confusion).tolist() == [1.0, 0.5, 0.5]
    metrics = classification_metrics(scores, labels, ["a", "b", "c"], ks=(1, 2))
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    assert metrics["acc/c"] == 0.5


def test_topk_ties_count_against_the_true_class():
    assert topk_accuracy(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]), ks=(1, 2)) == {
        "top1": 0.0,
        "top2": 1.0,
    }


def test_labels_out_of_range_are_reported():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 5]))
