"""Label-free metrics (RankMe, alignment, uniformity, modality gap) equal their formulas on
small fixed inputs; validation reports them (and retrieval per Matryoshka prefix) and one of
them can pick the best checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.eval.diagnostics import RANKME_EPS, alignment, modality_gap, uniformity
from mmalign.eval.diagnostics import effective_rank as rankme
from mmalign.eval.label_free import label_free_metrics
from mmalign.training import train
from tests.train_support import metrics, tiny_config, write_shards


def test_rankme_is_the_exponential_entropy_of_normalized_singular_values() -> None:
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # singular values 3 and 1
    p = [3 / 4 + RANKME_EPS, 1 / 4 + RANKME_EPS]
    assert rankme(z) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    assert rankme(z.double() @ rotation) == pytest.approx(rankme(z), rel=1e-9)  # rotation invariant
    assert rankme(torch.eye(5)) == pytest.approx(5.0, rel=1e-5)  # full rank
    collapsed = torch.tensor([[1.0, 2.0, 3.0]]).repeat(6, 1)
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-4)


def test_alignment_uniformity_and_gap_equal_their_formulas() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    # squared distances 2, 0, 0.08
    assert alignment(x, y) == pytest.approx((2 + 0 + 0.08) / 3, rel=1e-12)
    circle = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # squared distances 2, 4, 2
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert uniformity(circle) == pytest.approx(expected, rel=1e-12)
    assert uniformity(circle, t=1.0) == pytest.approx(
        math.log((2 * math.exp(-2) + math.exp(-4)) / 3), rel=1e-12
    )  # t is the temperature of the Gaussian potential
    gap = math.dist([(1 + 0 + 0.6) / 3, (0 + 1 + 0.8) / 3], [0.8 / 3, 2.6 / 3])
    assert modality_gap(x, y) == pytest.approx(gap, rel=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        uniformity(x[:1])


def test_metrics_use_present_rows_and_average_each_family() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.8, 0.6], [1.0, 0.0]], dtype=torch.float64)
    present = {"x": torch.tensor([True, True, True, False]), "y": torch.tensor([1, 0, 1, 1]) > 0}
    out = label_free_metrics({"x": x, "y": y}, present)
    both = torch.tensor([0, 2])
    assert out["val/alignment/x-y"] == pytest.approx(alignment(x[both], y[both]), rel=1e-12)
    assert out["val/gap/x-y"] == pytest.approx(modality_gap(x[:3], y[[0, 2, 3]]), rel=1e-12)
    assert out["val/rank/y"] == pytest.approx(rankme(y[present["y"]]), rel=1e-12)
    assert out["val/uniformity/x"] == pytest.approx(uniformity(x[:3]), rel=1e-12)
    assert out["val/rank/mean"] == pytest.approx((out["val/rank/x"] + out["val/rank/y"]) / 2)
    assert out["val/alignment/mean"] == out["val/alignment/x-y"]  # one pair
    assert set(out) == {
        f"val/{family}/{name}"
        for family, names in [
            ("rank", ["x", "y", "mean"]),
            ("uniformity", ["x", "y", "mean"]),
            ("alignment", ["x-y", "mean"]),
            ("gap", ["x-y", "mean"]),
        ]
        for name in names
    }


def test_validation_reports_them_per_prefix_and_they_pick_the_best_checkpoint(
    tmp_path: Path,
) -> None:
    train_shards = write_shards(tmp_path, "train", shards=1, per_shard=32, seed=0)
    val_shards = write_shards(tmp_path, "val", shards=1, per_shard=16, seed=1)
    out = tmp_path / "run"
    config = tiny_config(
        out,
        train_shards,
        val_shards,
        model={"matryoshka": [2, 4, 8]},
        train={"steps": 6},
        eval={"every": 2, "best_metric": "val/rank/mean", "best_mode": "max"},
    )
    train(config)
    validations = [r for r in metrics(out) if "val/loss" in r]
    assert len(validations) == 3
    last = validations[-1]
    assert {"val/rank/x", "val/alignment/x-y", "val/gap/mean", "val/uniformity/y"} <= set(last)
    assert {
        "val/dim2/instance/R@1/mean",
        "val/dim4/instance/R@1/x->y",
        "val/instance/R@1/mean",
    } <= set(last)
    assert "val/dim8/instance/R@1/mean" not in last  # the full size has no prefix
    best = json.loads((out / "checkpoints" / "best" / "trainer.json").read_text())
    assert best["step"] == max(validations, key=lambda r: r["val/rank/mean"])["step"]
