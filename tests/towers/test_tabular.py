"""Tabular tower: standardization buffers, missing-value indicators, errors, saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.training import train
from tests.train_support import tiny_config

LABS = {"type": "tabular", "in_features": 4, "hidden": 16, "layers": 2}


def test_forward_standardizes_zero_fills_and_appends_missing_indicators() -> None:
    tower = build_tower(LABS).eval()
    tower.mean.copy_(torch.tensor([1.0, -2.0, 0.5, 10.0]))
    tower.std.copy_(torch.tensor([2.0, 0.5, 1.0, 4.0]))
    raws = [[3.0, np.nan, 0.5, 2.0], [np.nan, -1.0, None, 14.0]]
    expected_inputs = torch.tensor(
        [[1.0, 0.0, 0.0, -2.0, 0, 1, 0, 0], [0.0, 2.0, 0.0, 1.0, 1, 0, 1, 0]]
    )
    assert tower.mlp[0].in_features == 8
    with torch.no_grad():
        out = tower(tower.collate([tower.preprocess(raw) for raw in raws]))
        torch.testing.assert_close(out, tower.mlp(expected_inputs))
    assert out.shape == (2, 16) and tower.width == 16


def test_missing_entry_differs_from_an_entry_at_the_mean() -> None:
    tower = build_tower(LABS).eval()
    with torch.no_grad():
        missing = tower(tower.collate([tower.preprocess([0.0, np.nan, 1.0, 2.0])]))
        at_mean = tower(tower.collate([tower.preprocess([0.0, 0.0, 1.0, 2.0])]))
    assert (missing - at_mean).abs().max() > 1e-4


def test_fit_normalization_ignores_nan_and_guards_degenerate_columns() -> None:
    tower = build_tower(LABS)
    data = np.array([[1.0, 5.0, np.nan, 3.0], [2.0, 5.0, np.nan, np.nan], [6.0, 5.0, np.nan, 7.0]])
    tower.fit_normalization(data)
    torch.testing.assert_close(tower.mean, torch.tensor([3.0, 5.0, 0.0, 5.0]))
    torch.testing.assert_close(
        tower.std, torch.tensor([float(np.std([1.0, 2.0, 6.0])), 1.0, 1.0, 2.0])
    )
    with pytest.raises(ValueError, match=r"needs \[N, 4\] vectors, got shape \(3,\)"):
        tower.fit_normalization([1.0, 2.0, 3.0])


def test_batch_composition_does_not_change_embeddings() -> None:
    tower = build_tower({**LABS, "dropout": 0.5}).eval()
    raws = np.random.default_rng(0).normal(size=(5, 4))
    raws[1, 2] = np.nan
    items = [tower.preprocess(raw) for raw in raws]
    with torch.no_grad():
        batch = tower(tower.collate(items))
        alone = torch.cat([tower(tower.collate([item])) for item in items])
    torch.testing.assert_close(batch, alone)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1.0, 2.0, 3.0], r"length 4 \(in_features\), got shape \(3,\)"),
        ([[1.0, 2.0, 3.0, 4.0]], r"1-D vector of length 4.*\(1, 4\)"),
        ([np.nan] * 4, "every entry is NaN"),
        ([None] * 4, "every entry is NaN"),
        (["a", "b", "c", "d"], "entries must be numbers.*dtype <U1"),
        ([1.0, "x", 2.0, 3.0], "entries must be numbers"),
        ([1.0, {"a": 1}, 2.0, 3.0], "entries must be numbers"),
        ([1.0, np.inf, 2.0, -np.inf], r"infinite values at positions \[1, 3\]"),
    ],
)
def test_bad_vectors_give_clear_errors(raw: object, message: str) -> None:
    tower = build_tower(LABS, field="model.towers.labs")
    with pytest.raises(ValueError, match=message) as error:
        tower.preprocess(raw)
    assert "model.towers.labs" in str(error.value)


def test_bad_config_gives_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.towers\.labs\.in_features"):
        build_tower({"type": "tabular"}, field="model.towers.labs")
    with pytest.raises(ConfigError, match=r"model\.towers\.labs\.layers"):
        build_tower({**LABS, "layers": 0}, field="model.towers.labs")


def test_statistics_are_saved_with_the_weights(tmp_path: Path) -> None:
    model = AlignmentModel.from_config({"dim": 8, "towers": {"labs": LABS}})
    model.towers["labs"].fit_normalization(np.random.default_rng(1).normal(3.0, 2.0, (50, 4)))
    raws = [[1.0, np.nan, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    embeddings = model.encode("labs", raws)
    assert embeddings.shape == (2, 8)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    saved = model.save_pretrained(tmp_path / "saved")
    weights = load_file(saved / "model.safetensors")
    torch.testing.assert_close(weights["towers.labs.mean"], model.towers["labs"].mean)
    torch.testing.assert_close(weights["towers.labs.std"], model.towers["labs"].std)
    loaded = AlignmentModel.from_pretrained(saved)
    torch.testing.assert_close(loaded.towers["labs"].std, model.towers["labs"].std)
    torch.testing.assert_close(loaded.encode("labs", raws), embeddings)


def test_normalize_fit_in_the_config_fits_the_first_records_and_is_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = rng.normal([5.0, -2.0, 100.0, 0.0], [2.0, 0.5, 30.0, 1.0], size=(40, 4))
    values[rng.random(values.shape) < 0.25] = np.nan  # missing entries
    values[7] = np.nan  # a record without labs at all: not counted
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{shard:06d}.tar")) as writer:
            for index in range(20 * shard, 20 * shard + 20):
                record = {"__key__": f"r{index:03d}", "x.npy": values[index].astype(np.float32)}
                if not np.isnan(values[index]).all():
                    record["labs.npy"] = values[index].astype(np.float32)
                writer.write(record)
    config = tiny_config(tmp_path / "run", str(tmp_path / "train-{000000..000001}.tar"))
    config["model"]["towers"] = {
        "labs": {**LABS, "normalize": "fit", "normalize_records": 25},
        "x": {**LABS, "hidden": 8},
    }
    config["data"]["fields"] = {"labs": "labs.npy", "x": "x.npy"}
    result = train(config, ["train.steps=2"])
    first = values[[i for i in range(40) if not np.isnan(values[i]).all()][:25]]
    assert len(first) == 25  # 26 records read, one of them without labs
    model = AlignmentModel.from_pretrained(result.model_dir)
    labs = model.towers["labs"]
    np.testing.assert_allclose(labs.mean.numpy(), np.nanmean(first, axis=0), rtol=1e-6)
    np.testing.assert_allclose(labs.std.numpy(), np.nanstd(first, axis=0), rtol=1e-6)
    assert labs.mean.abs().max() > 1.0  # not the defaults
    torch.testing.assert_close(model.towers["x"].mean, torch.zeros(4))  # not asked: untouched
    torch.testing.assert_close(model.towers["x"].std, torch.ones(4))
    log = (result.output_dir / "train.log").read_text()
    assert "labs: normalization statistics fit over 25 records" in log
    # resuming the finished run keeps the statistics (no refit)
    again = AlignmentModel.from_pretrained(train(config, ["train.steps=2"], resume=True).model_dir)
    torch.testing.assert_close(again.towers["labs"].mean, labs.mean)


def test_feature_masking_marks_features_missing_in_training_only() -> None:
    tower = build_tower({"type": "tabular", "in_features": 6, "augment_feature_mask": 0.5})
    row = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]
    assert int(tower.preprocess(row).isnan().sum()) == 1
    torch.manual_seed(0)
    masks = [tower.preprocess(row, augment=True).isnan() for _ in range(10)]
    assert all(int(mask.sum()) == 1 + 3 for mask in masks)  # floor(0.5 * 6) more
    assert len({tuple(mask.tolist()) for mask in masks}) > 1
    tiny = build_tower({"type": "tabular", "in_features": 2, "augment_feature_mask": 0.9})
    assert int(tiny.preprocess([1.0, float("nan")], augment=True).isnan().sum()) == 1  # one kept
