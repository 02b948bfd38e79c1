"""NaN/Inf inputs or losses never reach the parameters or the Adam moments; the run reports
each skipped step and stops cleanly after ``train.max_nonfinite`` in a row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

from mmalign.batch import Batch
from mmalign.training import TrainingStopped, train
from mmalign.training.accumulation import ContrastiveStep
from mmalign.training.trainer import Trainer

STEPS = 8


def snapshot(trainer: Trainer) -> dict[str, Any]:
    """Copies of every parameter and every optimizer state tensor."""
    optimizer = {
        f"{index}.{name}": value.clone()
        for index, state in trainer.optimizer.state_dict()["state"].items()
        for name, value in state.items()
    }
    parameters = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"parameters": parameters, "optimizer": optimizer}


def same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class StepRecorder:
    """Wraps ``Trainer._train_step``: the state before and after each call, and whether the
    call was skipped as non-finite."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any], bool]] = []
        original = Trainer._train_step

        def recorded(trainer: Trainer) -> Any:
            before, skipped = snapshot(trainer), trainer.nonfinite_total
            try:
                return original(trainer)
            finally:  # also when the call stops the run
                self.calls.append((before, snapshot(trainer), trainer.nonfinite_total > skipped))

        monkeypatch.setattr(Trainer, "_train_step", recorded)


def poison_inputs(monkeypatch: pytest.MonkeyPatch, calls: set[int], value: float) -> None:
    """Put ``value`` into the tabular inputs of the micro-batches numbered ``calls``."""
    original, count = Trainer._micro_batch, [0]

    def poisoned(trainer: Trainer) -> Batch:
        batch = original(trainer)
        count[0] += 1
        if count[0] in calls:
            batch.inputs["labs"] = batch.inputs["labs"].clone()
            batch.inputs["labs"][0, 1] = value
        return batch

    monkeypatch.setattr(Trainer, "_micro_batch", poisoned)


def poison_losses(monkeypatch: pytest.MonkeyPatch, calls: set[int] | None) -> None:
    """Make the loss NaN on the objective calls numbered ``calls`` (every call when None)."""
    original, count = ContrastiveStep.objective, [0]

    def poisoned(module: ContrastiveStep, *args: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = original(module, *args)
        count[0] += 1
        return (loss * math.nan if calls is None or count[0] in calls else loss), metrics

    monkeypatch.setattr(ContrastiveStep, "objective", poisoned)


def test_nonfinite_steps_are_skipped_without_touching_state(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = StepRecorder(monkeypatch)
    poison_inputs(monkeypatch, {3}, math.inf)
    poison_losses(monkeypatch, {6})  # the objective's 6th call: step 5 after one skip
    result = train(tiny_config(tmp_path / "run", shards, train={"steps": STEPS}))

    assert result.steps == STEPS and result.nonfinite_steps == 2
    skipped = [index for index, (_, _, was) in enumerate(recorder.calls) if was]
    assert skipped == [2, 5] and len(recorder.calls) == STEPS + 2
    for index, (before, after, was_skipped) in enumerate(recorder.calls):
        if was_skipped:
            assert same(before["parameters"], after["parameters"]), index
            assert same(before["optimizer"], after["optimizer"]), index
        elif index > 0:
            assert not same(before["parameters"], after["parameters"]), index
        assert all(torch.isfinite(v).all() for v in after["optimizer"].values())
        assert all(torch.isfinite(v).all() for v in after["parameters"].values())
    steps = {int(v) for k, v in recorder.calls[-1][1]["optimizer"].items() if k.endswith("step")}
    assert steps == {STEPS}  # Adam counted only the applied updates
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 3: non-finite loss nan; step skipped (1 in a row, 1 in all" in log
    assert "non-finite loss nan; step skipped (1 in a row, 2 in all" in log
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/nonfinite_skipped"] == 2 and math.isfinite(last["train/loss"])


def test_run_stops_cleanly_after_max_nonfinite_in_a_row(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = StepRecorder(monkeypatch)
    poison_losses(monkeypatch, None)
    config = tiny_config(tmp_path / "run", shards, train={"max_nonfinite": 3})
    with pytest.raises(TrainingStopped, match=r"3 non-finite losses/gradients in a row \(train"):
        train(config)
    assert len(recorder.calls) == 3
    first_parameters = recorder.calls[0][0]["parameters"]
    assert same(recorder.calls[-1][1]["parameters"], first_parameters)
    assert recorder.calls[-1][1]["optimizer"] == {}  # Adam never saw a gradient
    assert not (tmp_path / "run" / ".lock").exists(), "a stopped run must release its lock"
    assert (tmp_path / "run" / "train.log").read_text().count("non-finite loss nan") == 3
