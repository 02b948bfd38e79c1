"""All three terms on 2 gloo processes x 3 accumulated micro-batches equal one process on the
whole batch: losses of each term, parameters and the queue after two steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.model import AlignmentModel
from tests.train_support import finish, start_launch
from tests.training import terms_launch

pytestmark = pytest.mark.launches


def test_terms_on_two_processes_with_accumulation_equal_one_process(tmp_path: Path) -> None:
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 8} for name in "ab"}
    torch.manual_seed(5)
    teacher = tmp_path / "teacher"
    AlignmentModel.from_config({"dim": 4, "towers": towers}).save_pretrained(teacher)
    launched = start_launch(
        [terms_launch.__file__, str(tmp_path), str(teacher)], tmp_path / "launch.log"
    )
    single = terms_launch.run(teacher)
    status, log = finish(launched, tmp_path / "launch.log")
    assert status == 0, log
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    assert [r["teacher_calls"] for r in ranks] == [6, 6]  # 2 steps x 3 micro-batches, once each
    names = ("loss", "loss/main", "loss/two_view_a", "loss/distill", "loss/queue")
    for rank in ranks:
        for step, expected in enumerate(single["metrics"]):
            for name in names:
                assert rank["metrics"][step][name] == pytest.approx(expected[name], rel=1e-9)
        for name, value in single["state"].items():
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-9, atol=1e-12)
    assert int(single["state"]["objective.queue.b_count"]) == 20
