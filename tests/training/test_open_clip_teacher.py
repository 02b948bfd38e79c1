"""A raw open_clip model as the distill teacher: by local folder or name + checkpoint file, its
similarities are open_clip's own encode_image / encode_text logits, and a run trains with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmalign.batch import Batch
from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.terms import load_teacher
from tests.tiny_clip import (
    LOGIT_SCALE,
    TINY_CLIP,
    random_clip,
    random_images,
    write_image_text_shards,
    write_open_clip_folder,
)
from tests.train_support import metrics

VIT = {"image_size": 32, "patch_size": 16, "width": 16, "layers": 1, "head_width": 8}
STUDENT = {
    "photo": {"type": "image", "embed_dim": 12, "vision_cfg": VIT},
    "caption": {"type": "text", "width": 16, "heads": 2, "layers": 1, "context_length": 16},
}
ENCODERS = {"photo": "image", "caption": "text"}


def _teacher_term(kind: str, tmp_path: Path) -> dict:
    folder = write_open_clip_folder(tmp_path / "clip", random_clip(seed=3))
    if kind == "folder":
        return {"type": "distill", "teacher": str(folder), "teacher_encoders": ENCODERS}
    config_file = tmp_path / "mmalign-tiny-teacher.json"  # a registered custom open_clip name
    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    return {
        "type": "distill",
        "teacher": str(folder / "open_clip_model.safetensors"),
        "teacher_model": "mmalign-tiny-teacher",
        "teacher_encoders": ENCODERS,
    }


def _student(term: dict) -> AlignmentModel:
    objective = {"name": "clip", "terms": [term]}
    return AlignmentModel.from_config({"dim": 8, "towers": STUDENT, "objective": objective})


@pytest.mark.parametrize("kind", ["folder", "name+checkpoint"])
def test_teacher_similarities_are_open_clips_logits(kind: str, tmp_path: Path) -> None:
    student = _student(_teacher_term(kind, tmp_path))
    teacher = load_teacher(student)
    assert teacher is not None
    photo, caption = student.tower("photo"), student.tower("caption")
    texts = ["a photo of a one", "two", "the number three", "zero zero", "four"]
    inputs = {
        "photo": photo.collate([photo.preprocess(image) for image in random_images(5)]),
        "caption": caption.collate([caption.preprocess(text) for text in texts]),
    }
    present = torch.ones(5, 2, dtype=torch.bool)
    batch = Batch(keys=list("abcde"), modalities=list(inputs), inputs=inputs, present=present)
    embedded = teacher.embed(batch)
    scale = student.objective.teacher_logit_scale  # the multiplier: the checkpoint's, 42
    assert scale == pytest.approx(math.exp(LOGIT_SCALE))
    ours = scale * embedded["photo@teacher"] @ embedded["caption@teacher"].T

    reference = random_clip(seed=3)  # the same weights, through open_clip itself
    with torch.no_grad():
        image = F.normalize(reference.encode_image(inputs["photo"]), dim=-1)
        text = F.normalize(reference.encode_text(inputs["caption"]), dim=-1)
        expected = reference.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert embedded["photo@teacher"].shape == (5, TINY_CLIP["embed_dim"])  # student dim: 8


def test_a_run_trains_with_an_open_clip_teacher(tmp_path: Path) -> None:
    shard = tmp_path / "data" / "train-000000.tar"
    write_image_text_shards(shard, 16)
    term = {**_teacher_term("folder", tmp_path), "weight": 5.0}
    config = {
        "model": {"dim": 8, "towers": STUDENT, "objective": {"name": "clip", "terms": [term]}},
        "data": {
            "train": str(shard),
            "fields": {"photo": "png", "caption": "txt"},
            "batch_size": 8,
            "shuffle_buffer": 0,
            "resampled": False,
        },
        "train": {"steps": 8, "lr": 0.01, "output": str(tmp_path / "run"), "log_every": 1},
    }
    config["train"] |= {"tensorboard": False, "plots": False}
    result = train(config)
    assert result.steps == 8
    distill = [r["train/loss/distill"] for r in metrics(result.output_dir) if "train/loss" in r]
    assert len(distill) == 8 and all(math.isfinite(value) for value in distill)
    assert sum(distill[-2:]) < sum(distill[:2])  # the student moves towards the teacher


def test_open_clip_teacher_errors_name_the_field(tmp_path: Path) -> None:
    folder = write_open_clip_folder(tmp_path / "clip", random_clip())
    wrong = {"type": "distill", "teacher": str(folder), "teacher_encoders": {"audio": "image"}}
    with pytest.raises(ConfigError, match=r"teacher_encoders names \['audio'\]"):
        load_teacher(_student(wrong))
    saved = tmp_path / "mmalign-teacher"
    _student({"type": "distill", "teacher": "unused"}).save_pretrained(saved)
    mapped = {"type": "distill", "teacher": str(saved), "teacher_encoders": ENCODERS}
    with pytest.raises(ConfigError, match="is not an open_clip folder; remove teacher_encoders"):
        load_teacher(_student(mapped))
    unknown = {"type": "distill", "teacher": str(folder), "teacher_model": "no-such-clip"}
    with pytest.raises(ConfigError, match="teacher_model 'no-such-clip' is not an open_clip"):
        load_teacher(_student(unknown))
