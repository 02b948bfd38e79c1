"""Two steps of a model with all three terms (two_view, distill, queue), launched by
``tests/training/test_terms_distributed.py`` on 2 gloo processes with 3 micro-batches each,
and run in the test's own process on the whole batch: ``python terms_launch.py OUT TEACHER``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mmalign.batch import Batch
from mmalign.model import AlignmentModel
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from mmalign.training.terms import end_step, load_teacher

COLUMNS = ("a", "b", "a@view2")
STEPS, ROWS, MICRO = 2, 12, 3


def student(teacher: Path) -> AlignmentModel:
    """A tiny float64 student whose objective has all three terms."""
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 8} for name in "ab"}
    terms = [
        {"type": "two_view", "modality": "a", "weight": 0.5},
        {"type": "distill", "teacher": str(teacher), "weight": 2.0},
        {"type": "queue", "size": 20},  # step 2 evicts the first 4 rows of step 1
    ]
    torch.manual_seed(0)
    config = {"dim": 6, "towers": towers, "objective": {"name": "clip", "terms": terms}}
    return AlignmentModel.from_config(config).double()


def make_batch(raw: dict[str, torch.Tensor], present: torch.Tensor, rows: slice) -> Batch:
    """A loader-style batch of ``rows``: inputs hold only the present rows of each column."""
    present = present[rows]
    inputs = {name: raw[name][rows][present[:, j]] for j, name in enumerate(COLUMNS)}
    keys = [str(row) for row in range(present.shape[0])]
    return Batch(keys=keys, modalities=list(COLUMNS), inputs=inputs, present=present)


def data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    total = STEPS * ROWS
    raw = {
        name: torch.randn(total, 3, generator=generator, dtype=torch.float64) for name in COLUMNS
    }
    present = torch.ones(total, 3, dtype=torch.bool)
    for row, column in [(1, 1), (4, 0), (9, 1), (14, 0), (20, 1)]:
        present[row, column] = False
    present[:, 2] = present[:, 0]  # the second view is there when its modality is
    return raw, present


def run(teacher_dir: Path) -> dict:
    """Two optimizer steps; each process takes its contiguous share of every global batch,
    in ``MICRO`` micro-batches when there are several processes."""
    accelerator = Accelerator(cpu=True)
    processes, rank = accelerator.num_processes, accelerator.process_index
    model = student(teacher_dir)
    teacher = load_teacher(model)
    assert teacher is not None
    teacher.model.double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step_module, optimizer = accelerator.prepare(ContrastiveStep(model, teacher), optimizer)
    raw, present = data()
    share = ROWS // processes
    count = MICRO if processes > 1 else 1
    size = share // count
    results: dict = {"world_size": processes, "metrics": []}
    for step in range(STEPS):
        start = step * ROWS + rank * share
        batches = [
            make_batch(raw, present, slice(start + i * size, start + (i + 1) * size))
            for i in range(count)
        ]
        outcome = accumulated_step(accelerator, step_module, batches, lambda: None)
        optimizer.step()
        optimizer.zero_grad()
        end_step(model)
        results["metrics"].append(outcome.metrics)
    results["state"] = {name: value.detach().clone() for name, value in model.state_dict().items()}
    results["teacher_calls"] = teacher.calls
    return results


if __name__ == "__main__":
    out, teacher_path = Path(sys.argv[1]), Path(sys.argv[2])
    result = run(teacher_path)
    torch.save(result, out / f"rank{Accelerator(cpu=True).process_index}.pt")
