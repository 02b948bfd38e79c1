"""Linear probe and few-shot: C chosen on held-out train, refit, scored on test; seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from mmalign.eval.probe import C_GRID, linear_probe, run_probe
from tests.eval.test_zeroshot import TEXT, tabular, tiny_model, write_shards


def _blobs(rows: int, seed: int, spread: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 6))
    labels = generator.integers(0, 4, rows)
    x = centres[labels] + spread * generator.normal(size=(rows, 6))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def test_probe_chooses_c_on_held_out_train_then_refits_on_all_of_it() -> None:
    x, y = _blobs(300, seed=0)
    tx, ty = _blobs(200, seed=1)
    result = linear_probe(x, y, tx, ty, seed=3)
    xs, ys = x.numpy(), y.numpy()
    fit, held = train_test_split(np.arange(300), test_size=0.2, random_state=3, stratify=ys)
    scores = {
        c: LogisticRegression(C=c, max_iter=1000, random_state=3)
        .fit(xs[fit], ys[fit])
        .score(xs[held], ys[held])
        for c in C_GRID
    }
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    refit = LogisticRegression(C=best, max_iter=1000, random_state=3).fit(xs, ys)
    assert result["C"] == best and result["validation_top1"] == pytest.approx(scores[best])
    assert result["top1"] == pytest.approx(refit.score(tx.numpy(), ty.numpy()))
    assert (result["fit_samples"], result["test_samples"]) == (300, 200)
    assert 0.5 < result["top1"] < 1.0  # overlapping blobs: a real, imperfect probe
    assert linear_probe(x, y, tx, ty, seed=3) == result  # seeded


def test_few_shot_fits_k_samples_per_class_and_validates_on_the_rest() -> None:
    x, y = _blobs(300, seed=0)
    tx, ty = _blobs(200, seed=1)
    results = {k: linear_probe(x, y, tx, ty, shots=k, seed=0) for k in (1, 10)}
    assert [results[k]["fit_samples"] for k in (1, 10)] == [4, 40]
    assert results[10]["top1"] > results[1]["top1"]  # more shots, a better probe
    again = linear_probe(x, y, tx, ty, shots=1, seed=0)
    assert again == results[1]  # seeded
    assert linear_probe(x, y, tx, ty, shots=1, seed=1)["top1"] != again["top1"]  # other draws
    with pytest.raises(ValueError, match="5000-shot needs more"):
        linear_probe(x, y, tx, ty, shots=5000)


def test_run_probe_embeds_the_labelled_splits_with_the_model(tmp_path) -> None:
    model = tiny_model("clip", {"x": tabular(6), "text": TEXT})
    data = {}
    for split, seed in (("train", 0), ("test", 1)):
        x, y = _blobs(60, seed=seed)
        records = [
            {"__key__": f"{split}{i:03d}", "x.npy": x[i].numpy(), "cls": int(y[i])}
            for i in range(60)
        ]
        records[3]["cls"] = -1  # unlabelled: left out
        data[split] = (write_shards(tmp_path / f"{split}-000000.tar", records), x, y)
    results = run_probe(
        model, data["train"][0], data["test"][0], "x", [2], fields={"x": "x.npy"}, batch_size=16
    )
    keep = np.arange(60) != 3
    embedded = {
        split: (model.encode("x", data[split][1][keep].tolist()), data[split][2][keep])
        for split in ("train", "test")
    }
    expected = linear_probe(*embedded["train"], *embedded["test"])
    assert results["linear"] == pytest.approx(expected)
    assert results["2-shot"] == pytest.approx(
        linear_probe(*embedded["train"], *embedded["test"], shots=2)
    )
