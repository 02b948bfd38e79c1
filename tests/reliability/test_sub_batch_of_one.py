"""Every tower of the demo trains on a sub-batch of one: batch size 1, or a batch where only
one sample has the modality (BatchNorm's batch statistics do not exist for one value per
channel; the running statistics are used and left unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.batch import Batch
from mmalign.config import load_config
from mmalign.model import AlignmentModel

DEMO = Path(__file__).resolve().parents[2] / "mmalign" / "demo" / "configs" / "demo_digits.yaml"


def raw_sample(modality: str, index: int) -> object:
    rng = np.random.default_rng(index)
    if modality == "image":
        return rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    if modality == "text":
        return f"a handwritten {index}"
    if modality == "audio":
        return (rng.normal(size=11200).astype(np.float32) * 0.1, 16000)
    return {"x": [[0.5, -0.5]], "edge_index": [[], []]}  # one single-node graph


@pytest.fixture(scope="module")
def model() -> AlignmentModel:
    # sigmoid: a single row still has a loss (and gradients) of its own; default graph tower
    overrides = [
        "model.objective={name: sigmoid}",
        "model.towers.graph={type: graph, in_features: 2}",
    ]
    torch.manual_seed(0)
    return AlignmentModel.from_config(load_config(DEMO, overrides).model).train()


def batch_norm_state(model: AlignmentModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def batch_of(model: AlignmentModel, present: list[list[bool]]) -> Batch:
    names = model.modalities
    mask = torch.tensor(present)
    inputs = {}
    for column, name in enumerate(names):
        tower = model.towers[name]
        rows = [i for i in range(len(present)) if present[i][column]]
        items = [tower.preprocess(raw_sample(name, i)) for i in rows]
        inputs[name] = tower.collate(items) if items else None
    keys = [f"k{i}" for i in range(len(present))]
    return Batch(keys=keys, modalities=names, inputs=inputs, present=mask)


@pytest.mark.parametrize(
    "present",
    [
        [[True, True, True, True]],  # batch size 1
        [[True, True, True, True], [False, True, True, False], [False, True, True, False]],
    ],
    ids=["batch-of-one", "one-sample-has-image-and-graph"],
)
def test_every_tower_trains_on_a_sub_batch_of_one(
    model: AlignmentModel, present: list[list[bool]]
) -> None:
    assert model.modalities == ["image", "text", "audio", "graph"]
    before = batch_norm_state(model)
    assert before, "the demo image and default graph towers have BatchNorm layers"
    model.zero_grad()
    batch = batch_of(model, present)
    output = model.loss(model(batch), batch)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    for name in ("image", "graph"):
        grads = [p.grad for p in model.towers[name].parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        assert any(bool(g.abs().sum() > 0) for g in grads), name
    after = batch_norm_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.training for layer in model.modules())


def test_two_samples_still_update_batch_statistics(model: AlignmentModel) -> None:
    before = batch_norm_state(model)
    model(batch_of(model, [[True] * 4, [True] * 4]))
    after = batch_norm_state(model)
    image = [k for k in before if k.startswith("towers.image")]
    assert image and any(not torch.equal(before[k], after[k]) for k in image)
