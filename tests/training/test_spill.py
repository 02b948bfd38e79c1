"""Spilled micro-batch inputs: exact accumulation gives bit-identical weights, files go away."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch_geometric.data import Data

from mmalign.batch import Batch
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from mmalign.training.host_memory import _glibc
from mmalign.training.spill import InputSpill, should_spill
from tests.train_support import model_weights, tiny_config, write_shards

MODALITIES = ["graph", "table"]


def _model() -> AlignmentModel:
    towers = {
        "graph": {"type": "graph", "in_features": 2, "hidden": 8, "layers": 1},
        "table": {"type": "tabular", "in_features": 3, "hidden": 8},
    }
    torch.manual_seed(0)
    config = {"dim": 6, "towers": towers, "objective": {"name": "clip"}}
    return AlignmentModel.from_config(config)


def _micro_batches(model: AlignmentModel, step: int, count: int = 3) -> list[Batch]:
    """``count`` micro-batches of 4 rows; one row of each lacks its table."""
    generator = torch.Generator().manual_seed(step)
    batches = []
    for part in range(count):
        graphs = [
            Data(
                x=torch.randn(3 + row % 2, 2, generator=generator),
                edge_index=torch.tensor([[0, 1], [1, 2]]),
            )
            for row in range(4)
        ]
        present = torch.ones(4, 2, dtype=torch.bool)
        present[part, 1] = False
        inputs = {
            "graph": model.towers["graph"].collate(graphs),
            "table": torch.randn(3, 3, generator=generator),
        }
        keys = [f"{step}-{part}-{row}" for row in range(4)]
        batches.append(Batch(keys=keys, modalities=MODALITIES, inputs=inputs, present=present))
    return batches


def _train(directory: Path | None) -> dict[str, torch.Tensor]:
    """Two optimizer steps of K = 3; with ``directory``, the inputs spill there."""
    model = _model()
    step_module = ContrastiveStep(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        batches = iter(_micro_batches(model, step))
        if directory is None:
            outcome = accumulated_step(Accelerator(), step_module, batches, lambda: None)
        else:
            with InputSpill(directory) as spill:
                outcome = accumulated_step(
                    Accelerator(), step_module, batches, lambda: None, spill=spill
                )
                assert list(spill.root.iterdir()) == []  # each file goes once read back
        assert outcome.finite
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_spilled_inputs_give_bit_identical_weights(tmp_path: Path) -> None:
    kept = _train(None)
    spilled = _train(tmp_path)
    assert kept.keys() == spilled.keys()
    initial = _model().state_dict()
    assert sum(not torch.equal(value, initial[name]) for name, value in kept.items()) > 4
    for name, value in kept.items():
        assert torch.equal(spilled[name], value), name
    assert list(tmp_path.iterdir()) == []


def test_spill_directory_is_removed_on_error(tmp_path: Path) -> None:
    model = _model()
    batches = _micro_batches(model, 0)
    with pytest.raises(RuntimeError, match="stop"), InputSpill(tmp_path) as spill:
        spill.put(0, batches[0])
        assert len(list(spill.root.iterdir())) == 1
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_spill_round_trip_and_auto_threshold() -> None:
    model = _model()
    batch = _micro_batches(model, 0)[0]
    with InputSpill() as spill:
        spill.put(3, batch)
        back = spill.take(3)
    graph, original = back.inputs["graph"], batch.inputs["graph"]
    assert graph.num_graphs == original.num_graphs == 4
    for name in ("x", "edge_index", "batch", "ptr"):
        assert torch.equal(getattr(graph, name), getattr(original, name)), name
    assert torch.equal(back.inputs["table"], batch.inputs["table"])
    assert back.keys == batch.keys and torch.equal(back.present, batch.present)
    assert not spill.root.exists()
    assert should_spill("auto", batch, 3) is False  # a few hundred bytes: not worth it
    assert should_spill(True, batch, 3) and not should_spill(True, batch, 1)
    assert not should_spill(False, batch, 3)


def test_training_with_spilled_inputs_equals_training_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.spill_inputs: true`` through the trainer: the same weights, bit for bit, and
    no spill directory left behind."""
    shards = write_shards(tmp_path / "shards", "train", shards=1, per_shard=32, missing=0.2)
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    spilled: list[int] = []
    put = InputSpill.put
    monkeypatch.setattr(
        InputSpill,
        "put",
        lambda self, index, batch: (spilled.append(index), put(self, index, batch)),
    )
    weights, releases = {}, {}
    for spill in (False, True):
        train_section = {"steps": 2, "accumulate": 3, "spill_inputs": spill}
        run = train(tiny_config(tmp_path / f"run-{spill}", shards, train=train_section))
        weights[spill] = model_weights(run.output_dir)
        log = (run.output_dir / "train.log").read_text()
        releases[spill] = log.count("host memory: release (glibc: a mapping per allocation")
    assert spilled == [0, 1, 2, 0, 1, 2]  # the spilling run's two steps of K = 3
    if _glibc() is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        assert releases == {False: 0, True: 1}  # host_memory auto: release once spilling
    for name, value in weights[False].items():
        assert torch.equal(weights[True][name], value), name
    assert not [path for path in spill_root.iterdir() if path.name.startswith("mmalign-spill")]
