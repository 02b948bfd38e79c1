"""Figures a person reads: distinct colours kept per series name, loss plots without
timings, validation means as series over steps, temperature = 1 / logit scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.eval.plots import series_colours
from mmalign.training import train
from mmalign.training.curves import PLOTS, collect_series
from tests.train_support import metrics, tiny_config, write_shards


def test_series_colours_are_distinct_and_follow_the_name() -> None:
    directions = [f"{a}->{b}" for a in "wxyz" for b in "wxyz" if a != b]
    colours = series_colours(directions)
    assert len(set(colours.values())) == len(directions) == 12
    assert series_colours(reversed(directions)) == colours
    few = series_colours(["text->image", "image->text"])
    assert few["image->text"] != few["text->image"]


def test_training_curves_of_a_run(tmp_path: Path) -> None:
    train_shards = write_shards(tmp_path / "data", "train", shards=1, per_shard=16)
    val_shards = write_shards(tmp_path / "data", "val", shards=1, per_shard=8, seed=1)
    out = tmp_path / "run"
    config = tiny_config(
        out, train_shards, val_shards, train={"steps": 4, "plots": True}, eval={"every": 2}
    )
    train(config)
    records = metrics(out)
    logged = [r for r in records if "train/temperature" in r]
    # the objective logs the scale it used, the trainer the temperature after the update
    assert logged and all(
        r["train/temperature"] * r["train/logit_scale"] == pytest.approx(1.0, rel=0.02)
        for r in logged
    )
    assert all(0.05 < r["train/temperature"] < 0.1 for r in logged)  # init 0.07, not 14.3
    assert any("time/loss" in r for r in records)
    loss_keys = set(collect_series(records, PLOTS["loss.png"][0]))
    assert {"train/loss", "val/loss"} <= loss_keys
    assert not any(key.startswith("time/") for key in loss_keys)
    validation = collect_series(records, PLOTS["validation.png"][0])
    steps, values = validation["val/instance/R@1/mean"]
    assert steps == [2, 4] and all(0 <= value <= 1 for value in values)  # a line over steps
    assert "val/class/R@1/mean" in validation  # the shards hold labels (cls)
    for png in ("loss.png", "temperature.png", "validation.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
