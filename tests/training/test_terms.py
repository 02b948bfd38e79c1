"""The terms in training: exact accumulation, the teacher once per micro-batch, the loader's
seeded second views, logged terms, and a resumed run that continues exactly (queue included)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from mmalign.batch import Batch
from mmalign.config import load_config
from mmalign.data import loader_from_config
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from mmalign.training.terms import load_teacher
from mmalign.training.trainer import Trainer
from tests.train_support import metrics, model_weights, tiny_config, write_shards

COLUMNS = ("a", "b", "a@view2")


def _save_teacher(directory: Path, features: int, dim: int = 4, names: str = "ab") -> Path:
    towers = {name: {"type": "tabular", "in_features": features, "hidden": 8} for name in names}
    torch.manual_seed(5)
    AlignmentModel.from_config({"dim": dim, "towers": towers}).save_pretrained(directory)
    return directory


def _student(teacher: Path) -> AlignmentModel:
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 8} for name in "ab"}
    terms = [
        {"type": "two_view", "modality": "a", "weight": 0.5},
        {"type": "distill", "teacher": str(teacher), "weight": 2.0},
        {"type": "queue", "size": 20},
    ]
    torch.manual_seed(0)
    config = {"dim": 6, "towers": towers, "objective": {"name": "clip", "terms": terms}}
    return AlignmentModel.from_config(config).double()


def _batch(raw: dict[str, torch.Tensor], present: torch.Tensor, rows: slice) -> Batch:
    present = present[rows]
    inputs = {name: raw[name][rows][present[:, j]] for j, name in enumerate(COLUMNS)}
    keys = [str(row) for row in range(present.shape[0])]
    return Batch(keys=keys, modalities=list(COLUMNS), inputs=inputs, present=present)


def test_accumulated_terms_equal_the_big_batch_and_the_teacher_runs_once(tmp_path: Path) -> None:
    micro, count = 4, 3
    generator = torch.Generator().manual_seed(1)
    raw = {name: torch.randn(12, 3, generator=generator, dtype=torch.float64) for name in COLUMNS}
    present = torch.ones(12, 3, dtype=torch.bool)
    present[2, 0] = present[2, 2] = present[7, 1] = False  # a view has what its modality has
    queued = {m: torch.nn.functional.normalize(torch.randn(9, 6, dtype=torch.float64), dim=-1)
              for m in "ab"}  # fmt: skip
    teacher_dir = _save_teacher(tmp_path / "teacher", features=3)
    models = []
    for _ in range(2):
        model = _student(teacher_dir)
        model.objective.queue.push(queued)
        teacher = load_teacher(model)
        assert teacher is not None
        teacher.model.double()
        models.append((model, teacher))

    (reference, reference_teacher) = models[0]
    big = _batch(raw, present, slice(0, 12))
    embeddings = {**reference(big), **reference_teacher.embed(big)}
    expected = reference.loss(embeddings, big)
    expected.loss.backward()

    model, teacher = models[1]
    step = ContrastiveStep(model, teacher)
    batches = [_batch(raw, present, slice(i * micro, (i + 1) * micro)) for i in range(count)]
    outcome = accumulated_step(Accelerator(), step, batches, lambda: None)

    assert teacher.calls == count  # once per micro-batch, though each is encoded twice
    for name in ("loss", "loss/main", "loss/two_view_a", "loss/distill", "loss/queue"):
        assert outcome.metrics[name] == pytest.approx(expected.metrics[name], rel=1e-10)
    for (name, p_ref), p_acc in zip(reference.named_parameters(), model.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_acc.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), "train", 1, 32, seed=0, missing=0.2)


def _sections(teacher: Path) -> dict:
    tower = {"type": "tabular", "in_features": 4, "hidden": 16, "augment_feature_mask": 0.5}
    terms = [
        {"type": "two_view", "modality": "x"},
        {"type": "distill", "teacher": str(teacher), "temperature": 0.1},
        {"type": "queue", "size": 16},
    ]
    return {
        "model": {
            "towers": {"x": tower, "y": {"type": "tabular", "in_features": 4, "hidden": 16}},
            "objective": {"name": "clip", "terms": terms},
        },
        "train": {"steps": 4, "save_every": 2},
    }


def test_second_views_are_seeded_per_record(tmp_path: Path, shards: str) -> None:
    config = load_config(tiny_config(tmp_path, shards, **_sections(tmp_path)))
    model = AlignmentModel.from_config(config.model)
    views: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for batch_size in (4, 8):
        data = config.data.model_copy(update={"batch_size": batch_size})
        loader = loader_from_config(data, model.towers, "train", two_view=["x"], label_field=None)
        seen = {}
        for batch in loader:
            first, second = batch.inputs["x"], batch.inputs["x@view2"]
            assert torch.equal(batch.present_of("x"), batch.present_of("x@view2"))
            for row, key in enumerate(batch.keys):
                seen[key] = (first[row], second[row])
        views.append(seen)
    assert views[0].keys() == views[1].keys() and len(views[0]) == 32
    for key, (first, second) in views[0].items():
        assert torch.equal(first.isnan(), views[1][key][0].isnan())
        assert torch.equal(second.isnan(), views[1][key][1].isnan())
        assert int(first.isnan().sum()) == int(second.isnan().sum()) == 2  # floor(0.5 * 4)
    assert any(not torch.equal(a.isnan(), b.isnan()) for a, b in views[0].values())


def test_a_run_logs_each_term_and_resumes_exactly(
    tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = _sections(_save_teacher(tmp_path / "teacher", 4, dim=12, names="xy"))
    sections["eval"] = {"every": 2}
    straight = train(tiny_config(tmp_path / "straight", shards, shards, **sections))
    assert any("val/loss" in r for r in metrics(straight.output_dir))  # without views, teacher
    records = [r for r in metrics(straight.output_dir) if "train/loss" in r]
    for record in records:
        parts = [record[f"train/loss/{name}"] for name in ("two_view_x", "distill", "queue")]
        assert all(math.isfinite(part) for part in parts)
        assert record["train/loss"] == pytest.approx(record["train/loss/main"] + sum(parts))

    after_step = Trainer._after_step

    def stop_after_two(self: Trainer) -> None:
        after_step(self)
        if self.step == 2:
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(Trainer, "_after_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(interrupted, shards, shards, **sections))
    monkeypatch.undo()
    (interrupted / ".lock").unlink(missing_ok=True)
    train(tiny_config(interrupted, shards, shards, **sections), resume=True)

    expected, actual = model_weights(straight.output_dir), model_weights(interrupted)
    assert "objective.queue.y_embeddings" in expected
    assert int(expected["objective.queue.y_count"]) == 16  # 4 steps x 8 rows, the last 16
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-6, atol=1e-7, msg=name)
    saved = load_file(interrupted / "checkpoints" / "step-00000002" / "model.safetensors")
    assert int(saved["objective.queue.x_count"]) == 16  # the checkpoint carries the queue


def _audio_shards(directory: Path) -> str:
    """One shard of 16 short wav clips with captions."""
    import io

    import numpy as np
    import soundfile
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(directory / "train-000000.tar")) as writer:
        for index in range(16):
            buffer = io.BytesIO()
            clip = rng.uniform(-0.5, 0.5, 4000).astype(np.float32)
            soundfile.write(buffer, clip, 16000, format="WAV")
            writer.write({"__key__": f"c{index:03d}", "wav": buffer.getvalue(), "txt": "a beep"})
    return str(directory / "train-000000.tar")


def test_audio_views_get_seeded_frequency_masks_and_train(tmp_path: Path) -> None:
    """two_view on audio with augment_freq_mask: each view's band comes from the loader's
    per-record seed (the same in a second pass, so resumable; not the same in both views),
    and a run trains with it."""
    audio = {"type": "audio", "encoder": "cnn", "clip_seconds": 0.25, "width": 8}
    audio |= {"n_mels": 16, "augment_freq_mask": 0.5, "cnn_channels": [4]}
    towers = {"audio": audio, "caption": {"type": "text", "width": 8, "heads": 2, "layers": 1}}
    config = {
        "model": {
            "dim": 4,
            "towers": towers,
            "objective": {"name": "clip", "terms": [{"type": "two_view", "modality": "audio"}]},
        },
        "data": {
            "train": _audio_shards(tmp_path / "data"),
            "fields": {"audio": "wav", "caption": "txt"},
            "batch_size": 8,
            "shuffle_buffer": 0,
            "resampled": False,
        },
        "train": {"steps": 2, "output": str(tmp_path / "run"), "log_every": 1},
    }
    config["train"] |= {"tensorboard": False, "plots": False}
    loaded = load_config(config)
    model = AlignmentModel.from_config(loaded.model)
    passes = []
    for _ in range(2):
        loader = loader_from_config(
            loaded.data, model.towers, "train", two_view=["audio"], label_field=None
        )
        batch = next(iter(loader))
        passes.append((batch.inputs["audio"]["mel_keep"], batch.inputs["audio@view2"]["mel_keep"]))
    assert torch.equal(passes[0][0], passes[1][0]) and torch.equal(passes[0][1], passes[1][1])
    assert not torch.equal(passes[0][0], passes[0][1]) and not bool(passes[0][0].all())
    result = train(config)
    losses = [
        r["train/loss/two_view_audio"] for r in metrics(result.output_dir) if "train/loss" in r
    ]
    assert len(losses) == 2 and all(math.isfinite(value) for value in losses)
