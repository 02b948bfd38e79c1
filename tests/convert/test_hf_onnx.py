"""mmalign -> Hugging Face and ONNX: ``convert --to hf`` folders load with ``AutoModel`` and
their saved projection reproduces the tower's embedding; ``convert --to onnx`` graphs run in
onnxruntime with the torch model's output for image, text, audio and tabular towers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from mmalign.cli.main import main
from mmalign.convert import to_onnx
from mmalign.model import AlignmentModel
from tests.tiny_clip import random_images
from tests.towers.test_audio import make_wav2vec2
from tests.towers.test_image_text import SENTENCES, make_hf_text

VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}


def clips(count: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Waveforms of different lengths (some shorter than the tower's clip)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(2000 + 1500 * i).astype(np.float32), 16000) for i in range(count)]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved model with a BERT text tower, a wav2vec2 audio tower and a tabular tower."""
    root = tmp_path_factory.mktemp("hf_model")
    towers = {
        "text": {
            "type": "text",
            "backend": "hf",
            "path": str(make_hf_text(root / "bert")),
            "pooling": "mean",
        },
        "audio": {"type": "audio", "encoder": "hf", "path": str(root / "w2v"), "clip_seconds": 0.5},
        "labs": {"type": "tabular", "in_features": 3},
    }
    make_wav2vec2(root / "w2v")
    torch.manual_seed(0)
    return AlignmentModel.from_config({"dim": 12, "towers": towers}).save_pretrained(root / "model")


def test_hf_folders_load_with_automodel_and_the_projection_gives_the_embedding(
    hf_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "hf"
    assert main(["convert", str(hf_model), "--to", "hf", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == [
        ".mmalign-output.json",
        "README.md",
        "audio",
        "text",
    ]
    model = AlignmentModel.from_pretrained(hf_model)

    bert = transformers.AutoModel.from_pretrained(out / "text").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "text")
    with safe_open(out / "text" / "projection.safetensors", "pt") as file:
        weight, metadata = file.get_tensor("weight"), file.metadata()
    assert metadata["pooling"] == "mean" and weight.shape == (12, 32)
    tokens = tokenizer(SENTENCES[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = model.encode("text", SENTENCES[:6])
    assert (F.normalize(pooled @ weight.T, dim=-1) - expected).abs().max() <= 1e-6

    wav2vec2 = transformers.AutoModel.from_pretrained(out / "audio").eval()
    assert isinstance(
        transformers.AutoFeatureExtractor.from_pretrained(out / "audio"),
        transformers.Wav2Vec2FeatureExtractor,
    )
    with safe_open(out / "audio" / "projection.safetensors", "pt") as file:
        weight = file.get_tensor("weight")
    tower = model.towers["audio"]
    inputs = tower.collate([tower.preprocess(clip) for clip in clips(3)])
    with torch.no_grad():
        hidden = wav2vec2(inputs["input_values"]).last_hidden_state
    frames = wav2vec2._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
    pooled = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(frames.tolist())])
    expected = model.encode("audio", clips(3))
    assert (F.normalize(pooled @ weight.T, dim=-1) - expected).abs().max() <= 1e-5
    readme = (out / "README.md").read_text()
    assert "| `text/` | `BertModel` |" in readme and "mean over real tokens" in readme

    tabular_only = AlignmentModel.from_config(
        {"dim": 4, "towers": {"x": {"type": "tabular", "in_features": 3}}}
    )
    capsys.readouterr()
    assert (
        main(
            [
                "convert",
                str(tabular_only.save_pretrained(tmp_path / "t")),
                "--to",
                "hf",
                "--out",
                str(tmp_path / "no"),
            ]
        )
        == 2
    )
    assert "no tower of this model came from transformers (x: tabular)" in capsys.readouterr().err


def onnx_embeddings(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {name: value.numpy() for name, value in inputs.items()})[0]


def test_onnx_graphs_equal_torch_for_image_text_audio_tabular(
    hf_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    towers = {
        "image": {"type": "image", "embed_dim": 24, "vision_cfg": VIT},
        "text": {"type": "text", "width": 32, "heads": 2, "layers": 1, "context_length": 16},
        "audio": {"type": "audio", "clip_seconds": 0.5, "width": 32, "heads": 2, "n_mels": 32},
        "cnn_audio": {"type": "audio", "encoder": "cnn", "clip_seconds": 0.5, "width": 16},
        "labs": {"type": "tabular", "in_features": 3},
    }
    model = AlignmentModel.from_config({"dim": 12, "towers": towers}).eval()
    assert (
        main(
            [
                "convert",
                str(model.save_pretrained(tmp_path / "model")),
                "--to",
                "onnx",
                "--out",
                str(tmp_path / "onnx"),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert manifest["audio"]["inputs"] == {"waveform": "float32", "length": "int64"}
    raws = {
        "image": random_images(3),
        "text": SENTENCES[:3],
        "audio": clips(3),
        "cnn_audio": clips(3),
        "labs": [[0.1, 2.0, float("nan")], [1.0, -1.0, 0.5], [3.0, 0.0, 0.0]],
    }
    for name, samples in raws.items():  # batch of 3: the graphs were traced with 2
        tower = model.towers[name]
        inputs = tower.collate([tower.preprocess(sample) for sample in samples])
        named = (
            inputs if isinstance(inputs, dict) else {next(iter(manifest[name]["inputs"])): inputs}
        )
        with torch.no_grad():
            expected = model.embed(name, inputs).numpy()
        assert (
            np.abs(onnx_embeddings(tmp_path / "onnx" / f"{name}.onnx", named) - expected).max()
            <= 1e-4
        ), name

    hf = AlignmentModel.from_pretrained(hf_model)
    to_onnx(hf, tmp_path / "hf_onnx", ["text"])
    tower = hf.towers["text"]
    inputs = tower.collate([tower.preprocess(text) for text in SENTENCES[:5]])  # other length
    with torch.no_grad():
        expected = hf.embed("text", inputs).numpy()
    assert (
        np.abs(onnx_embeddings(tmp_path / "hf_onnx" / "text.onnx", inputs) - expected).max() <= 1e-4
    )

    graph = {"type": "graph", "in_features": 2, "hidden": 8, "layers": 1}
    with_graph = AlignmentModel.from_config(
        {"dim": 8, "towers": {"g": graph, "labs": towers["labs"]}}
    )
    capsys.readouterr()
    argv = ["convert", str(with_graph.save_pretrained(tmp_path / "g")), "--to", "onnx"]
    assert main([*argv, "--out", str(tmp_path / "g_onnx")]) == 2
    assert (
        "(model.towers.g.type: graph); pick the other towers with --modality"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "g_onnx").exists()
    assert main([*argv, "--out", str(tmp_path / "g_onnx"), "--modality", "labs"]) == 0
    assert sorted(p.name for p in (tmp_path / "g_onnx").iterdir()) == [
        ".mmalign-output.json",
        "labs.onnx",
        "onnx.json",
    ]
