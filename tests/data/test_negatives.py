"""Mined hard negatives in training: ``data.negatives`` adds each record's ``neg<i>.<ext>`` as
rows with only that modality; ``model.objective.hard_negatives`` makes the pairwise objectives
take every row with the candidate modality as a candidate (naive float64 references)."""

from __future__ import annotations

import pytest
import torch

from mmalign.config import DataConfig
from mmalign.data import loader_from_config
from mmalign.errors import ConfigError
from mmalign.objectives import build_objective
from tests.data.test_loader import EchoTower, write_shard
from tests.objectives.test_positives import _embeddings, _present, assert_loss_and_gradients_close


def _reference(emb, scale, present, names, bias=None):
    """Pair (a, b): queries are rows with both; a -> b takes every row with b as candidate,
    b -> a every row with a (softmax: mean of directions; sigmoid: a -> b entries)."""
    a, b = names
    rows = range(present.shape[0])
    valid = [i for i in rows if present[i, 0] and present[i, 1]]
    total = 0.0
    for i in valid:
        if bias is None:
            for query, key, column in ((a, b, 1), (b, a, 0)):
                candidates = [k for k in rows if present[k, column]]
                logits = torch.stack([scale * emb[query][i] @ emb[key][k] for k in candidates])
                own = scale * emb[query][i] @ emb[key][i]
                total = total + (torch.logsumexp(logits, 0) - own) / 2
        else:
            for k in (k for k in rows if present[k, 1]):
                label = 1.0 if k == i else -1.0
                logit = scale * emb[a][i] @ emb[b][k] + bias
                total = total - torch.log(torch.sigmoid(label * logit))
    return total / len(valid)


# rows 9..11 are mined negatives (only b); row 3 lacks b, row 5 lacks a
PRESENT = _present(12, 2, [(3, 1), (5, 0), (9, 0), (10, 0), (11, 0)])


@pytest.mark.parametrize("name", ["clip", "anchored"])
def test_softmax_hard_negatives_equal_the_reference(name):
    emb = _embeddings(["a", "b"], rows=12)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    config = {"name": name, "hard_negatives": True}
    if name == "anchored":
        config["anchor"] = "a"
    loss = build_objective(config)(emb, scale, present=PRESENT).loss
    assert_loss_and_gradients_close(
        loss, _reference(emb, scale, PRESENT, ["a", "b"]), [*emb.values(), scale]
    )
    without = build_objective({k: v for k, v in config.items() if k != "hard_negatives"})
    assert abs(without(emb, scale, present=PRESENT).loss.item() - loss.item()) > 1e-3


def test_sigmoid_hard_negatives_equal_the_reference():
    emb = _embeddings(["a", "b"], rows=12, seed=3)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = build_objective({"name": "sigmoid", "hard_negatives": True})(
        emb, scale, bias, present=PRESENT
    ).loss
    reference = _reference(emb, scale, PRESENT, ["a", "b"], bias)
    assert_loss_and_gradients_close(loss, reference, [*emb.values(), scale, bias])


def test_hard_negatives_with_multi_positives_and_everything_present_is_plain():
    emb = _embeddings(["a", "b"], rows=6)
    scale = torch.tensor(3.0, dtype=torch.float64)
    groups = torch.tensor([1, 1, 2, 3, 3, 3])
    plain = build_objective({"name": "clip", "positives": "multi"})(emb, scale, groups=groups)
    hard = build_objective({"name": "clip", "positives": "multi", "hard_negatives": True})
    assert torch.equal(hard(emb, scale, groups=groups).loss, plain.loss)


def test_symile_refuses_hard_negatives():
    with pytest.raises(ConfigError, match="hard_negatives"):
        build_objective({"name": "symile", "hard_negatives": True})


def test_loader_adds_negative_rows_for_training_only(tmp_path):
    shards = write_shard(
        tmp_path / "mined-000000.tar",
        [
            {"__key__": "r0", "bin": b"I0", "txt": "zero", "neg0.txt": "n00", "neg1.txt": "n01"},
            {"__key__": "r1", "bin": b"I1", "txt": "one"},
            {"__key__": "r2", "bin": b"I2", "txt": "two", "neg0.txt": "n20", "neg0.bin": b"x"},
        ],
    )
    data = DataConfig(
        train=shards,
        val=shards,
        fields={"image": "bin", "text": "txt"},
        negatives="text",
        shuffle_buffer=0,
        resampled=False,
        batch_size=3,
        group_field="cls",
    )
    towers = {"image": EchoTower(), "text": EchoTower()}
    loader = loader_from_config(data, towers, "train", label_field="cls")
    (batch,) = list(loader)
    assert batch.keys == ["r0", "r0/neg0", "r0/neg1", "r1", "r2", "r2/neg0"]
    has_image = [True, False, False, True, True, False]
    assert batch.present.tolist() == [[image, True] for image in has_image]
    assert [value for value, _ in batch.inputs["text"]] == [
        "zero",
        "n00",
        "n01",
        "one",
        "two",
        "n20",
    ]
    assert batch.labels.tolist()[1:3] == [-1, -1]
    assert len(set(batch.groups.tolist())) == 6
    assert loader.counters["used"] == 3
    (val,) = list(loader_from_config(data, towers, "val"))
    assert val.keys == ["r0", "r1", "r2"]
    with pytest.raises(ConfigError, match=r"data\.negatives"):
        loader_from_config(data.model_copy(update={"negatives": "audio"}), towers, "train")
