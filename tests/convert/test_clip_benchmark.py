"""CLIP_benchmark (its own command line and zero-shot code, ``clip_benchmark eval``) on a
model converted with ``mmalign convert --to open_clip`` and a local dataset in its
WebDataset layout agrees with ``mmalign zeroshot``: the same top-1 accuracy and the same
prediction for every image. It runs offline as is (``--no_amp`` keeps CPU autocast from
rounding features to bfloat16). One shim, for numpy 2: clip_benchmark 1.6.2's ``accuracy``
calls ``float()`` on a one-element array, an error under this numpy, so the test swaps in the
same function with a scalar sum (:func:`accuracy_numpy2`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from clip_benchmark import cli as clip_benchmark_cli
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification
from clip_benchmark.models import load_clip

from mmalign.cli.main import main
from mmalign.eval.zeroshot import ZeroShotClassifier
from mmalign.model import AlignmentModel
from mmalign.training import train
from tests.convert.test_open_clip import image_text_config
from tests.tiny_clip import CLASSNAMES, write_image_text_shards

STEPS = 40
"""A few steps on captioned images, so class scores differ by more than rounding."""
TEMPLATES = ["a photo of a {c}", "a photo of the {c}"]


def accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark's ``metrics.zeroshot_classification.accuracy``, summing to a scalar
    instead of ``float()`` of a one-element numpy array (rejected by numpy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def write_benchmark_dataset(root: Path) -> list[dict]:
    """CLIP_benchmark's WebDataset layout: ``test/0.tar`` (``png`` + ``cls``),
    ``test/nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt``."""
    records = write_image_text_shards(root / "test" / "0.tar", 40, seed=3)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return records


def test_clip_benchmark_agrees_with_mmalign_zeroshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    records = write_benchmark_dataset(tmp_path / "tiny")
    write_image_text_shards(tmp_path / "train" / "train-000000.tar", 64, seed=4)
    config = image_text_config(tmp_path / "run", str(tmp_path / "train" / "train-000000.tar"))
    config["train"].update(steps=STEPS, warmup=0, lr=3e-3)
    config["data"].update(resampled=True, batch_size=16)
    train(config)
    saved = tmp_path / "run" / "model"
    model = AlignmentModel.from_pretrained(saved)
    assert main(["convert", str(saved), "--to", "open_clip", "--out", str(tmp_path / "clip")]) == 0

    classes = {"classnames": CLASSNAMES, "templates": [t.replace("{c}", "{}") for t in TEMPLATES]}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    capsys.readouterr()
    argv = ["zeroshot", str(saved), "--data", str(tmp_path / "tiny" / "test" / "0.tar")]
    argv += ["--classes", str(tmp_path / "classes.json"), "--query", "image"]
    assert main([*argv, "--field", "image=png", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["samples"] == 40

    output = tmp_path / "benchmark.json"
    dataset_args = ["--dataset", "wds/tiny", "--dataset_root", str(tmp_path / "tiny")]
    model_args = ["--model", f"local-dir:{tmp_path / 'clip'}", "--pretrained", "converted"]
    run_args = ["--task", "zeroshot_classification", "--no_amp", "--num_workers", "0"]
    run_args += ["--batch_size", "16", "--output", str(output), "--quiet"]
    argv = ["clip_benchmark", "eval", *dataset_args, *model_args, *run_args]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy_numpy2)
    clip_benchmark_cli.main()
    theirs = json.loads(output.read_text())["metrics"]
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=1e-12)

    # per image: CLIP_benchmark's classifier and logits against mmalign's classifier
    clip, transform, tokenizer = load_clip(
        "open_clip", f"local-dir:{tmp_path / 'clip'}", "x", None, "cpu"
    )
    clip.eval()
    dataset = build_dataset("wds/tiny", root=str(tmp_path / "tiny"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, num_workers=0)
    weights = zeroshot_classification.zero_shot_classifier(
        clip, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(
        clip, weights, loader, "cpu", amp=False
    )
    classifier = ZeroShotClassifier.from_texts(model, CLASSNAMES, classes["templates"])
    images = {"image": [record["image"] for record in records]}
    assert torch.equal(target, torch.tensor([record["label"] for record in records]))
    assert (logits / 100.0 - classifier.scores(images)).abs().max() <= 1e-5  # 100: its scale
    assert torch.equal(logits.argmax(1), classifier.predict(images))
