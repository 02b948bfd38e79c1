"""``positives: exclude`` with every row of a batch in one group leaves no negative: the loss
of clip, anchored and symile is exactly 0. That is said once as a warning with the counts,
and every step's metrics count the rows (``train/positives/rows_without_negatives``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import good_record, tiny_config, write_shard

from mmalign.objectives import build_objective
from mmalign.training import train

OBJECTIVES = {
    "clip": {"name": "clip"},
    "anchored": {"name": "anchored", "anchor": "a"},
    "symile": {"name": "symile"},
    "symile n2": {"name": "symile", "negatives": "n2"},
}


def embeddings(rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.nn.functional.normalize(torch.randn(rows, 4, generator=generator), dim=1)
        for name in "abc"
    }


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_one_group_warns_once_with_the_counts_and_counts_in_the_metrics(objective: str) -> None:
    loss = build_objective({**OBJECTIVES[objective], "positives": "exclude"})
    one_group = torch.zeros(6, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [loss(embeddings(6), torch.tensor(10.0), groups=one_group) for _ in range(3)]
    assert all(float(output.loss) == 0.0 for output in outputs)
    assert [output.metrics["positives/rows_without_negatives"] for output in outputs] == [6.0] * 3
    assert len(caught) == 1, [str(warning.message) for warning in caught]
    message = str(caught[0].message)
    assert "6 of 6 rows share their group with every row" in message
    assert "model.objective.positives" in message

    mixed = torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = build_objective({**OBJECTIVES[objective], "positives": "exclude"})(
            embeddings(6), torch.tensor(10.0), groups=mixed
        )
    assert output.metrics["positives/rows_without_negatives"] == 0.0 and not caught
    assert float(output.loss) > 0


def test_training_on_one_group_records_it_in_metrics(tmp_path: Path) -> None:
    records = [{**good_record(index), "cls": b"7"} for index in range(16)]
    shard = write_shard(tmp_path / "shards" / "train-000000.tar", records)
    config = tiny_config(
        tmp_path / "run",
        str(shard),
        data={"group_field": "cls"},
        train={"steps": 2},
        model={"objective": {"name": "clip", "positives": "exclude"}},
    )
    with pytest.warns(UserWarning, match="8 of 8 rows share their group"):
        result = train(config)
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if "train/loss" in json.loads(line)]
    assert [step["train/positives/rows_without_negatives"] for step in steps] == [8.0, 8.0]
    assert [step["train/loss"] for step in steps] == [0.0, 0.0]
