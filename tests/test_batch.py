"""The Batch contract: columns of ``present`` are asked for by name, and the model reads them so."""

from __future__ import annotations

import pytest
import torch

from mmalign import AlignmentModel
from mmalign.batch import Batch, move_to


def _batch() -> Batch:
    return Batch(
        keys=["k0", "k1", "k2"],
        modalities=["a", "b"],
        inputs={"a": torch.randn(2, 3), "b": torch.randn(3, 2)},
        present=torch.tensor([[True, True], [False, True], [True, True]]),
        labels=torch.tensor([1, -1, 0]),
        groups=torch.tensor([7, 7, 9]),
    )


def test_present_columns_are_found_by_name_in_any_order() -> None:
    batch = _batch()
    assert batch.present_of("a").tolist() == [True, False, True]
    assert batch.present_for(["b", "a"]).tolist() == [[True, True], [True, False], [True, True]]
    with pytest.raises(KeyError, match="no modality 'c'"):
        batch.present_of("c")


def test_a_batch_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match=r"bool tensor \[2, 1\]"):
        Batch(["a", "b"], ["x"], {}, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Batch.groups must have shape \[2\]"):
        Batch(["a", "b"], ["x"], {}, torch.ones(2, 1, dtype=torch.bool), groups=torch.zeros(3))


def test_to_moves_nested_inputs_and_keeps_the_rest() -> None:
    batch = _batch()
    batch.inputs["b"] = {"ids": torch.zeros(3, 2), "lengths": [1, 2, 3]}
    moved = batch.to(torch.device("cpu"))
    assert moved.keys == batch.keys and moved.groups.tolist() == [7, 7, 9]
    assert moved.inputs["b"]["lengths"] == [1, 2, 3]
    assert move_to(("x", torch.ones(1)), "cpu")[0] == "x"
    assert len(Batch.empty(["a", "b"], {"seen": 2})) == 0


def test_the_model_reads_a_batch_by_modality_name() -> None:
    model = AlignmentModel.from_config(
        {
            "dim": 4,
            "towers": {
                "b": {"type": "tabular", "in_features": 2},
                "a": {"type": "tabular", "in_features": 3},
            },
        }
    ).eval()
    batch = _batch()  # modalities ["a", "b"]: the opposite of the model's tower order
    embeddings = model(batch)
    expected_a = model({"a": batch.inputs["a"]})["a"]
    torch.testing.assert_close(embeddings["a"][batch.present_of("a")], expected_a)
    assert torch.all(embeddings["a"][1] == 0)
    reordered = {"b": embeddings["b"], "a": embeddings["a"]}
    from_batch = model.loss(reordered, present=batch).loss
    from_mask = model.loss(reordered, present=batch.present_for(["b", "a"])).loss
    torch.testing.assert_close(from_batch, from_mask)
