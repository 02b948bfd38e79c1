"""AlignmentModel: presence scatter, temperature, loss, freezing, save/load, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmalign.config import ConfigError, load_config
from mmalign.model import AlignmentModel
from mmalign.objectives import build_objective
from tests.towers.test_image_text import (
    SENTENCES,
    TINY_IMAGE,
    TINY_TEXT,
    make_hf_text,
    make_sentencepiece,
    random_pil,
)

IMAGE_TEXT = {"dim": 16, "towers": {"image": TINY_IMAGE, "text": TINY_TEXT}}
AUDIO = {"type": "audio", "clip_seconds": 0.25, "width": 32, "heads": 2, "layers": 1}
GRAPH = {"type": "graph", "in_features": 2, "hidden": 16, "layers": 2}
TABULAR = {"type": "tabular", "in_features": 3, "hidden": 16}


def collated(model: AlignmentModel, modality: str, raws: list) -> object:
    tower = model.towers[modality]
    return tower.collate([tower.preprocess(raw) for raw in raws])


def graph_sample(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    nodes = int(rng.integers(3, 7))
    edges = np.stack([np.arange(nodes - 1), np.arange(1, nodes)])
    return {"x": rng.normal(size=(nodes, 2)).tolist(), "edge_index": edges.tolist()}


def test_present_scatter_rule_zeroes_absent_rows_and_keeps_present_ones() -> None:
    model = AlignmentModel.from_config(IMAGE_TEXT).eval()
    images = [random_pil(i) for i in range(5)]
    present = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    rows = present[:, 0].nonzero().squeeze(1).tolist()
    inputs = {
        "image": collated(model, "image", [images[i] for i in rows]),
        "text": collated(model, "text", [SENTENCES[i] for i in range(5) if present[i, 1]]),
    }
    out = model(inputs, present)
    assert out["image"].shape == out["text"].shape == (5, 16)
    assert torch.equal(out["image"][~present[:, 0]], torch.zeros(2, 16))
    assert torch.equal(out["text"][~present[:, 1]], torch.zeros(1, 16))
    everything = model({"image": collated(model, "image", images)})["image"]
    torch.testing.assert_close(out["image"][rows], everything[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["image"][rows].norm(dim=1), torch.ones(3))

    nobody = torch.tensor([[True, False]] * 3)
    out = model({"image": collated(model, "image", images[:3]), "text": None}, nobody)
    assert torch.equal(out["text"], torch.zeros(3, 16))


def test_forward_input_errors() -> None:
    model = AlignmentModel.from_config(IMAGE_TEXT)
    images = collated(model, "image", [random_pil(0), random_pil(1)])
    with pytest.raises(KeyError, match=r"unknown modality 'audio'; this model knows image, text"):
        model({"audio": images})
    with pytest.raises(ValueError, match=r"present must be a bool tensor \[B, 1\]"):
        model({"image": images}, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"has 2 rows but present marks 3"):
        model({"image": images}, torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"inputs\['image'\] is None; pass `present`"):
        model({"image": None})


def test_logit_scale_init_clamp_and_loss_match_the_objective() -> None:
    model = AlignmentModel.from_config(IMAGE_TEXT)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_bias is None
    embeddings = {
        "image": torch.nn.functional.normalize(torch.randn(6, 16), dim=-1),
        "text": torch.nn.functional.normalize(torch.randn(6, 16), dim=-1),
    }
    objective = build_objective({"name": "clip"})
    expected = objective(embeddings, torch.tensor(1 / 0.07)).loss
    torch.testing.assert_close(model.loss(embeddings).loss, expected)
    with torch.no_grad():
        model.logit_scale.fill_(6.0)  # above log(100): clamped
    assert model.logit_scale_value().item() == pytest.approx(100.0)
    torch.testing.assert_close(
        model.loss(embeddings).loss, objective(embeddings, torch.tensor(100.0)).loss
    )


def test_sigmoid_objective_gets_a_learnable_logit_bias() -> None:
    model = AlignmentModel.from_config({**IMAGE_TEXT, "objective": {"name": "sigmoid"}})
    assert model.logit_bias.item() == pytest.approx(-10.0) and model.logit_bias.requires_grad
    embeddings = {
        m: torch.nn.functional.normalize(torch.randn(4, 16), dim=-1) for m in ("image", "text")
    }
    loss = model.loss(embeddings).loss
    expected = build_objective({"name": "sigmoid"})(
        embeddings, torch.tensor(1 / 0.07), torch.tensor(-10.0)
    ).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


def test_frozen_tower_gets_no_gradient_stays_eval_and_unchanged() -> None:
    config = {**IMAGE_TEXT, "freeze": ["image"]}
    config["towers"] = {
        "image": {**TINY_IMAGE, "vision_cfg": {**TINY_IMAGE["vision_cfg"], "patch_dropout": 0.5}},
        "text": TINY_TEXT,
    }
    model = AlignmentModel.from_config(config).train()
    assert not any(module.training for module in model.towers["image"].modules())
    assert model.towers["text"].training and model.projections["image"].training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    inputs = {
        "image": collated(model, "image", [random_pil(i) for i in range(4)]),
        "text": collated(model, "text", SENTENCES[:4]),
    }
    model.loss(model(inputs)).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, value in model.towers["image"].named_parameters():
        assert not value.requires_grad and value.grad is None
        assert torch.equal(after[f"towers.image.{name}"], before[f"towers.image.{name}"]), name
    for name in (
        "projections.image.weight",
        "projections.text.weight",
        "logit_scale",
        "towers.text.encoder.module.token_embedding.weight",
    ):
        assert not torch.equal(after[name], before[name]), name
    counts = model.parameter_counts()
    image_total = sum(p.numel() for p in model.towers["image"].parameters())
    assert counts["tower/image"] == (0, image_total)
    assert "frozen" in repr(model) and f"0/{image_total:,}" in repr(model)


def test_freeze_unknown_modality_and_unknown_tower_type_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model.freeze: unknown modality audio; known: image"):
        AlignmentModel.from_config({**IMAGE_TEXT, "freeze": ["audio"]})
    with pytest.raises(ConfigError, match=r"model.towers.ecg.type: unknown tower type 'ekg'"):
        AlignmentModel.from_config({"towers": {"ecg": {"type": "ekg"}}})
    with pytest.raises(ConfigError, match=r"model.towers.text.path: .*is not a directory"):
        AlignmentModel.from_config(
            {"towers": {"text": {"type": "text", "backend": "hf", "path": "/nonexistent/bert"}}}
        )


def test_projection_kinds() -> None:
    none = AlignmentModel.from_config(
        {"dim": 32, "projection": "none", "towers": {"text": TINY_TEXT}}
    ).eval()
    tower = none.towers["text"]
    batch = collated(none, "text", SENTENCES[:3])
    expected = torch.nn.functional.normalize(tower(batch), dim=-1)
    torch.testing.assert_close(none({"text": batch})["text"], expected, rtol=0, atol=0)
    mlp = AlignmentModel.from_config({"dim": 8, "projection": "mlp", "towers": {"text": TINY_TEXT}})
    assert mlp.encode("text", SENTENCES[:2]).shape == (2, 8)
    with pytest.raises(
        ConfigError, match=r"model.projection: 'none'.*model.towers.text has width 32"
    ):
        AlignmentModel.from_config({"dim": 8, "projection": "none", "towers": {"text": TINY_TEXT}})


def test_from_config_accepts_yaml_whole_config_and_model_section(tmp_path: Path) -> None:
    run = {"model": IMAGE_TEXT, "train": {"steps": 3}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    for source in (
        tmp_path / "run.yaml",
        run,
        load_config(run),
        IMAGE_TEXT,
        load_config(run).model,
    ):
        model = AlignmentModel.from_config(source)
        assert model.modalities == ["image", "text"] and model.dim == 16
    with pytest.raises(ConfigError, match=r"model.dim"):
        AlignmentModel.from_config({**IMAGE_TEXT, "dim": 0})


def test_encode_restores_training_mode() -> None:
    model = AlignmentModel.from_config(IMAGE_TEXT).train()
    model.encode("text", SENTENCES[:2])
    assert model.training and model.towers["text"].training


def test_save_and_load_roundtrip_with_side_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    hf_dir = make_hf_text(source / "bert")
    spm_file = make_sentencepiece(source / "spm.model")
    config = {
        "dim": 16,
        "towers": {
            "image": TINY_IMAGE,
            "caption": TINY_TEXT,
            "bert": {"type": "text", "backend": "hf", "path": str(hf_dir), "pooling": "mean"},
            "multilingual": {
                "type": "text",
                "tokenizer": str(spm_file),
                "width": 16,
                "heads": 2,
                "layers": 1,
                "context_length": 24,
            },
        },
    }
    model = AlignmentModel.from_config(config)
    raws = {
        "image": [random_pil(i) for i in range(3)],
        "caption": SENTENCES[:3],
        "bert": ["a seven", "le chiffre sept", "die"],
        "multilingual": SENTENCES[2:5],
    }
    expected = {m: model.encode(m, r) for m, r in raws.items()}
    saved = model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)  # the saved model must not depend on the original files
    saved = saved.rename(tmp_path / "moved")

    loaded = AlignmentModel.from_pretrained(saved)
    for modality, raw in raws.items():
        assert torch.equal(loaded.encode(modality, raw), expected[modality]), modality
    written = json.loads((saved / "config.json").read_text())
    assert written["towers"]["multilingual"]["tokenizer"] == "tokenizer.model"
    assert (saved / "multilingual" / "tokenizer.model").is_file()
    assert written["towers"]["bert"]["path"] == "." and not written["towers"]["bert"]["pretrained"]
    assert (saved / "bert" / "config.json").is_file()
    assert not (saved / "image").exists()
    assert not list(saved.rglob("*.bin")) and not list(saved.rglob("*.pt"))


def test_all_five_tower_types_roundtrip(tmp_path: Path) -> None:
    towers = {
        "image": TINY_IMAGE,
        "text": TINY_TEXT,
        "audio": AUDIO,
        "graph": GRAPH,
        "labs": TABULAR,
    }
    model = AlignmentModel.from_config(
        {"dim": 8, "towers": towers, "objective": {"name": "symile"}}
    )
    rng = np.random.default_rng(0)
    model.towers["labs"].fit_normalization(rng.normal(3.0, 2.0, size=(20, 3)))
    raws = {
        "image": [random_pil(i) for i in range(3)],
        "text": SENTENCES[:3],
        "audio": [(rng.normal(size=n).astype(np.float32), 16000) for n in (2000, 4000, 5000)],
        "graph": [graph_sample(i) for i in range(3)],
        "labs": [[1.0, np.nan, 2.0], [0.0, 1.0, 5.0], [3.0, 3.0, np.nan]],
    }
    expected = {m: model.encode(m, r) for m, r in raws.items()}
    loaded = AlignmentModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert loaded.modalities == model.modalities
    for modality, raw in raws.items():
        got = loaded.encode(modality, raw)
        assert got.shape == (3, 8)
        assert torch.equal(got, expected[modality]), modality
    assert torch.equal(loaded.towers["labs"].mean, model.towers["labs"].mean)


def test_from_pretrained_refuses_directory_without_weights(tmp_path: Path) -> None:
    model = AlignmentModel.from_config({"dim": 4, "towers": {"labs": TABULAR}})
    saved = model.save_pretrained(tmp_path / "saved")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing"):
        AlignmentModel.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        AlignmentModel.from_pretrained(tmp_path / "empty")


def test_new_model_is_in_train_mode_everywhere_except_frozen_towers(tmp_path: Path) -> None:
    bert = make_hf_text(tmp_path / "bert")
    towers = {"image": TINY_IMAGE, "bert": {"type": "text", "backend": "hf", "path": str(bert)}}
    model = AlignmentModel.from_config({"dim": 8, "towers": towers, "freeze": ["image"]})
    assert all(module.training for module in model.towers["bert"].modules())
    assert not any(module.training for module in model.towers["image"].modules())
    loaded = AlignmentModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert not any(module.training for module in loaded.modules())
