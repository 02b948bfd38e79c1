"""Class-level retrieval beside instance-level retrieval: ``mmalign eval --label-field`` and
validation, against a naive float64 reference written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mmalign.config import ConfigError, load_config
from mmalign.eval import run_eval
from mmalign.eval.retrieval import pairwise_recall
from mmalign.model import AlignmentModel
from mmalign.training.validation import recall_metrics


def naive_retrieval(queries, gallery, query_ids, gallery_ids, ks=(1, 5, 10)) -> dict:
    """R@k and mAP by looping over queries in float64 (no ties in random data)."""
    queries, gallery = np.asarray(queries, np.float64), np.asarray(gallery, np.float64)
    hits_at = {k: [] for k in ks}
    precisions = []
    for i, query in enumerate(queries):
        relevant = np.asarray(gallery_ids) == query_ids[i]
        if not relevant.any():
            continue
        order = np.argsort(-(gallery @ query), kind="stable")
        ranked = relevant[order]
        first = int(np.argmax(ranked)) + 1
        for k in ks:
            hits_at[k].append(first <= k)
        positions = np.nonzero(ranked)[0] + 1
        precisions.append(np.mean(np.arange(1, len(positions) + 1) / positions))
    result = {f"R@{k}": float(np.mean(hits)) for k, hits in hits_at.items()}
    return {**result, "mAP": float(np.mean(precisions)), "queries": len(precisions)}


def test_pairwise_recall_at_class_level_matches_the_naive_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=generator), torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    labels[:5] = -1  # no label: left out at class level
    present = {
        "x": torch.ones(40, dtype=torch.bool),
        "y": torch.rand(40, generator=generator) > 0.2,
    }
    found = pairwise_recall({"x": x, "y": y}, present, [("x", "y")], labels=labels)[("x", "y")]
    rows_x, rows_y = labels >= 0, present["y"] & (labels >= 0)
    expected = naive_retrieval(
        x[rows_x], y[rows_y], labels[rows_x].tolist(), labels[rows_y].tolist()
    )
    assert found == pytest.approx(expected | {"median_rank": found["median_rank"]})
    assert found["queries"] == 35


def _write(path: Path, records: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_eval_reports_class_and_instance_levels_by_name(tmp_path: Path) -> None:
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 8} for name in ("x", "y")}
    model = AlignmentModel.from_config({"dim": 4, "towers": towers}).eval()
    rng = np.random.default_rng(3)
    xs, ys = (
        rng.normal(size=(30, 3)).astype(np.float32),
        rng.normal(size=(30, 3)).astype(np.float32),
    )
    labels = rng.integers(0, 3, size=30)
    records = [
        {"__key__": f"r{i:02d}", "x.npy": xs[i], "y.npy": ys[i], "cls": int(labels[i])}
        for i in range(30)
    ]
    shard = _write(tmp_path / "test-000000.tar", records)
    fields = {"x": "x.npy", "y": "y.npy"}
    report = run_eval(
        model, shard, tmp_path / "eval", fields=fields, label_field="cls", plots=False
    )
    with torch.no_grad():
        ex, ey = model.encode("x", list(xs)).double(), model.encode("y", list(ys)).double()
    metrics = report["metrics"]
    for query, gallery, (eq, eg) in (("x", "y", (ex, ey)), ("y", "x", (ey, ex))):
        by_class = naive_retrieval(eq, eg, labels.tolist(), labels.tolist())
        by_item = naive_retrieval(eq, eg, list(range(30)), list(range(30)))
        for metric in ("R@1", "R@5", "R@10", "mAP"):
            assert metrics[f"class/{metric}/{query}->{gallery}"] == pytest.approx(by_class[metric])
            assert metrics[f"instance/{metric}/{query}->{gallery}"] == pytest.approx(
                by_item[metric]
            )
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert saved["class/R@1/x->y"] == metrics["class/R@1/x->y"]
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert f"| x->y | class | {metrics['class/R@1/x->y']:.4f} |" in table
    assert f"| x->y | instance | {metrics['instance/R@1/x->y']:.4f} |" in table


def test_eval_without_labels_reports_instance_level_only(tmp_path: Path) -> None:
    towers = {name: {"type": "tabular", "in_features": 2} for name in ("x", "y")}
    model = AlignmentModel.from_config({"dim": 4, "towers": towers}).eval()
    records = [
        {"__key__": f"r{i}", "x.npy": np.full(2, i, np.float32), "y.npy": np.ones(2, np.float32)}
        for i in range(4)
    ]
    shard = _write(tmp_path / "test-000000.tar", records)
    fields = {"x": "x.npy", "y": "y.npy"}
    metrics = run_eval(model, shard, tmp_path / "eval", fields=fields, plots=False)["metrics"]
    assert "instance/R@1/x->y" in metrics
    assert not any(name.startswith("class/") for name in metrics)


def test_validation_names_both_levels_and_best_metric_may_be_either() -> None:
    towers = {name: {"type": "tabular", "in_features": 2} for name in ("a", "b")}
    model = AlignmentModel.from_config({"dim": 4, "towers": towers})
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(12, 4, generator=generator), torch.randn(12, 4, generator=generator)
    labels = torch.arange(12) % 3
    every = torch.ones(12, dtype=torch.bool)
    metrics = recall_metrics(model, {"a": a, "b": b}, {"a": every, "b": every}, labels=labels)
    for level, ids in (("class", labels.tolist()), ("instance", list(range(12)))):
        ab, ba = naive_retrieval(a, b, ids, ids), naive_retrieval(b, a, ids, ids)
        for metric in ("R@1", "R@5", "R@10", "mAP"):
            assert metrics[f"val/{level}/{metric}/a->b"] == pytest.approx(ab[metric])
            mean = (ab[metric] + ba[metric]) / 2
            assert metrics[f"val/{level}/{metric}/mean"] == pytest.approx(mean)
    unlabelled = recall_metrics(model, {"a": a, "b": b}, {"a": every, "b": every})
    assert not any("/class/" in name for name in unlabelled)
    base = {"model": {"towers": towers}}
    for name in ("val/class/R@1/mean", "val/instance/mAP/a->b"):
        assert load_config({**base, "eval": {"best_metric": name}}).eval.best_metric == name
    with pytest.raises(ConfigError, match=r"val/instance/R@1/mean .* or val/class/R@1/mean"):
        load_config({**base, "eval": {"best_metric": "val/R@1/mean"}})
