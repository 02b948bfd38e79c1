"""Gradient accumulation is contrastive-exact: K micro-batches give one big batch's gradients."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mmalign.batch import Batch
from mmalign.model import AlignmentModel
from mmalign.training.accumulation import ContrastiveStep, accumulated_step

MODALITIES = ("a", "b", "c")


def _model(objective: dict, dropout: float = 0.0) -> AlignmentModel:
    towers = {
        name: {"type": "tabular", "in_features": 3, "hidden": 8, "dropout": dropout}
        for name in MODALITIES
    }
    torch.manual_seed(0)
    return AlignmentModel.from_config({"dim": 6, "towers": towers, "objective": objective}).double()


def _batch(raw: dict[str, torch.Tensor], present: torch.Tensor) -> Batch:
    """A loader-style batch: inputs hold only the present rows of each modality."""
    inputs = {name: raw[name][present[:, j]] for j, name in enumerate(MODALITIES)}
    keys = [str(row) for row in range(present.shape[0])]
    return Batch(keys=keys, modalities=list(MODALITIES), inputs=inputs, present=present)


def _data(rows: int, missing: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    raw = {
        name: torch.randn(rows, 3, generator=generator, dtype=torch.float64) for name in MODALITIES
    }
    present = torch.ones(rows, len(MODALITIES), dtype=torch.bool)
    if missing:
        present[1, 0] = present[4, 2] = present[7, 1] = present[8, 0] = False
    return raw, present


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize(
    ("objective", "missing"),
    [
        ({"name": "clip"}, True),
        ({"name": "symile", "negatives": "n"}, False),
        ({"name": "symile", "negatives": "n"}, True),
    ],
)
def test_accumulated_gradients_equal_big_batch(objective: dict, missing: bool) -> None:
    micro, count = 4, 3
    raw, present = _data(micro * count, missing)

    reference = _model(objective)
    big = _batch(raw, present)
    output = reference.loss(reference(big), big, _seeded())
    output.loss.backward()
    expected = _grads(reference)

    accelerator = Accelerator()
    step = ContrastiveStep(_model(objective))
    micro_batches = [
        _batch(
            {n: v[i * micro : (i + 1) * micro] for n, v in raw.items()},
            present[i * micro : (i + 1) * micro],
        )
        for i in range(count)
    ]
    outcome = accumulated_step(accelerator, step, micro_batches, _seeded)

    assert outcome.finite
    assert outcome.loss == pytest.approx(float(output.loss.detach()), rel=1e-12)
    actual = _grads(step.model)
    assert expected.keys() == actual.keys() and len(actual) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_dropout_masks_are_replayed() -> None:
    """With dropout, the gradient is that of the loss of the cached (no-grad) features:
    each micro-batch is recomputed with the RNG state it was first encoded with."""
    micro, count = 4, 2
    raw, present = _data(micro * count, missing=False)
    parts = [
        _batch(
            {n: v[i * micro : (i + 1) * micro] for n, v in raw.items()},
            present[i * micro : (i + 1) * micro],
        )
        for i in range(count)
    ]

    reference = _model({"name": "clip"}, dropout=0.5)
    torch.manual_seed(7)
    embedded = [reference(part) for part in parts]
    joined = {name: torch.cat([e[name] for e in embedded]) for name in MODALITIES}
    reference.loss(joined, present).loss.backward()
    rng_after_reference = torch.get_rng_state()

    step = ContrastiveStep(_model({"name": "clip"}, dropout=0.5))
    torch.manual_seed(7)
    accumulated_step(Accelerator(), step, parts, lambda: None)

    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    expected, actual = _grads(reference), _grads(step.model)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_nonfinite_loss_backpropagates_nothing() -> None:
    raw, present = _data(8, missing=False)
    model = _model({"name": "clip"})
    raw["a"][0, 0] = float("inf")  # NaN would be a missing entry for the tabular tower
    step = ContrastiveStep(model)
    parts = [
        _batch({n: v[:4] for n, v in raw.items()}, present[:4]),
        _batch({n: v[4:] for n, v in raw.items()}, present[4:]),
    ]
    outcome = accumulated_step(Accelerator(), step, parts, lambda: None)
    assert not outcome.finite
    assert all(p.grad is None for p in model.parameters())
