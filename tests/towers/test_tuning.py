"""Fine-tuning a pretrained tower: last_blocks, LoRA (peft) with merged and unmerged saves,
layer-wise learning-rate decay, and the errors of their config keys."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import ConfigError, TrainConfig, load_config
from mmalign.model import AlignmentModel
from mmalign.training.optim import build_optimizer, build_scheduler
from mmalign.training.resume import apply_optimizer_settings
from tests.finetune_support import (
    TINY_AUDIO,
    TINY_OPEN_CLIP_TEXT,
    TINY_VIT,
    hf_text,
    parameters,
    raw_samples,
    train_steps,
)


def _model(towers: dict, **model: object) -> AlignmentModel:
    torch.manual_seed(0)
    return AlignmentModel.from_config({"dim": 8, "towers": towers, **model})


def test_last_blocks_trains_only_the_top_blocks_and_head(tmp_path: Path) -> None:
    model = _model(
        {
            "image": {**TINY_VIT, "trainable": {"last_blocks": 1}},
            "text": {**hf_text(tmp_path / "bert"), "trainable": {"last_blocks": 1}},
        }
    )
    before = parameters(model)
    train_steps(model, build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1)), 3)
    after = parameters(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}

    top = (
        r"towers\.image\.visual\.(transformer\.resblocks\.2\.|ln_post|proj)",
        r"towers\.text\.encoder\.module\.(encoder\.layer\.1\.|pooler)",
        r"projections\.|logit_scale",
    )
    trained = {name for name in before if any(re.match(pattern, name) for pattern in top)}
    frozen = set(before) - trained
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)  # bit-equal
    # everything on top that the loss reaches moved (BERT's pooler is unused by cls pooling)
    assert changed == {name for name in trained if ".pooler." not in name}
    assert any("resblocks.2.mlp" in name for name in changed)
    assert any("encoder.layer.1.output" in name for name in changed)


def _model_config(tmp_path: Path, lora: dict | None = None, merge: bool = False) -> dict:
    """Open_clip image and text, BERT and audio towers, with ``lora`` when given."""
    tuning = {"lora": lora, "merge_lora": merge} if lora else {}
    towers = {
        "image": TINY_VIT,
        "text": TINY_OPEN_CLIP_TEXT,
        "bert": hf_text(tmp_path / "bert"),
        "audio": TINY_AUDIO,
    }
    return {"dim": 8, "towers": {name: {**tower, **tuning} for name, tower in towers.items()}}


def _lora_model(tmp_path: Path, merge: bool) -> AlignmentModel:
    torch.manual_seed(0)
    config = _model_config(tmp_path, {"r": 4, "alpha": 8, "dropout": 0.1}, merge)
    return AlignmentModel.from_config(config)


def _embeddings(model: AlignmentModel) -> dict[str, torch.Tensor]:
    return {name: model.encode(name, raw_samples(tower)) for name, tower in model.towers.items()}


def test_lora_trains_only_adapters_and_projections(tmp_path: Path) -> None:
    model = _lora_model(tmp_path, merge=False)
    before = parameters(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        name for name in before if ".lora_" in name or re.match(r"projections|logit_", name)
    }
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable if "lora" in name}
    # open_clip and audio transformer: the MLP; BERT: peft's default query/value
    assert targets == {"c_fc", "c_proj", "query", "value", "linear1", "linear2"}
    train_steps(model, build_optimizer(model, TrainConfig(lr=1e-2)), 3)
    after = parameters(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    assert {name for name in changed if "lora_A" in name}  # the adapters learned
    assert all(
        any(name.startswith(f"towers.{m}.") and "lora_B" in name for name in changed)
        for m in model.modalities
    )


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_lora_saves_reload_with_the_same_embeddings(tmp_path: Path, merge: bool) -> None:
    model = _lora_model(tmp_path, merge)
    train_steps(model, build_optimizer(model, TrainConfig(lr=1e-2)), 2)
    reference = _embeddings(model)
    saved = model.save_pretrained(tmp_path / "saved")
    assert any(".lora_" in name for name, _ in model.named_parameters())  # model unchanged
    saved_keys = load_file(saved / "model.safetensors").keys()
    assert any(".lora_" in key for key in saved_keys) != merge
    if merge:
        assert saved_keys == AlignmentModel.from_config(_model_config(tmp_path)).state_dict().keys()

    with pytest.MonkeyPatch.context() as patch:
        if merge:  # any import of peft (or of one of its modules) now fails
            patch.setitem(sys.modules, "peft", None)
        reloaded_model = AlignmentModel.from_pretrained(saved)
        reloaded = _embeddings(reloaded_model)
    peft_modules = {
        type(m).__module__ for m in reloaded_model.modules() if "peft" in type(m).__module__
    }
    assert bool(peft_modules) != merge
    assert reloaded.keys() == reference.keys()
    for name, embedding in reloaded.items():
        torch.testing.assert_close(embedding, reference[name], rtol=1e-4, atol=1e-5)


def test_lora_without_peft_installed_is_a_one_line_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r"lora: LoRA adapters need the peft package") as caught:
        _lora_model(tmp_path, merge=False)
    assert "\n" not in str(caught.value)
    assert "mmalign[lora]" in str(caught.value)


def test_lora_on_multihead_attention_runs_and_out_proj_alone_is_refused() -> None:
    model = _model({"image": {**TINY_VIT, "lora": {"r": 2, "targets": ["attn"]}}, "b": TINY_AUDIO})
    before = parameters(model)
    train_steps(model, build_optimizer(model, TrainConfig(lr=1e-2)), 2)
    after = parameters(model)
    adapters = [name for name in before if ".lora_B." in name]
    assert len(adapters) == 6  # q/k/v (fused) and out_proj of each of the 3 blocks
    assert all(not torch.equal(before[name], after[name]) for name in adapters)
    base = [name for name in before if "attn.base_layer" in name and ".lora_" not in name]
    drift = max(float((after[name] - before[name]).abs().max()) for name in base)
    assert drift < 1e-6  # peft adds and subtracts the update each forward: rounding only
    with pytest.raises(ConfigError, match=r"model.towers.image.lora.targets: out_proj .* attn"):
        _model({"image": {**TINY_VIT, "lora": {"targets": ["out_proj"]}}})


def test_layer_decay_groups_follow_the_formula_and_survive_new_settings() -> None:
    model = _model({"image": TINY_VIT, "labs": {"type": "tabular", "in_features": 3}})
    config = TrainConfig(lr=0.1, layer_decay=0.5, weight_decay=0.2)
    optimizer = build_optimizer(model, config)

    def expected_scale(name: str) -> float:  # 3 blocks: stem 0.5^4, block i 0.5^(3-i), head 1
        block = re.search(r"resblocks\.(\d)\.", name)
        if block:
            return 0.5 ** (3 - int(block.group(1)))
        if re.match(
            r"towers\.image\.visual\.(conv1|class_embedding|positional_embedding|ln_pre)", name
        ):
            return 0.5**4
        return 1.0  # image head (ln_post, proj), the tabular tower, projections, temperature

    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        group = group_of[id(parameter)]
        assert group["lr"] == pytest.approx(0.1 * expected_scale(name)), name
        assert group["weight_decay"] == (
            0.2 if parameter.ndim >= 2 and "embedding" not in name else 0.0
        ), name
    assert optimizer.param_groups[0]["lr"] == 0.1  # the full rate first (logged as train/lr)
    assert {round(g["lr_scale"], 4) for g in optimizer.param_groups} == {
        1.0,
        0.5,
        0.25,
        0.125,
        0.0625,
    }

    scheduler = build_scheduler(optimizer, config, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = scheduler.lr_lambdas[0](3)
    apply_optimizer_settings(
        optimizer, scheduler, config.model_copy(update={"lr": 0.2, "weight_decay": 0.3})
    )
    for group in optimizer.param_groups:  # a resumed run with a new lr keeps the layer factors
        assert group["lr"] == pytest.approx(0.2 * group["lr_scale"] * factor)
        assert group["weight_decay"] == (0.3 if group["decays"] else 0.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"layer_decay": 1.5}}, r"train.layer_decay: 1.5 is outside \(0, 1\]"),
        ({"train": {"layer_decay": 0}}, r"train.layer_decay: 0(.0)? is outside \(0, 1\]"),
        ({"train": {"ema": 1.0}}, r"train.ema: 1.0 is outside \[0, 1\)"),
        ({"train": {"ema": -0.1}}, r"train.ema: -0.1 is outside \[0, 1\)"),
        ({"image": {"lora": {"r": 0}}}, r"model.towers.image.lora.r: .*greater than or equal to 1"),
        ({"image": {"lora": {"dropout": 1}}}, r"model.towers.image.lora.dropout: .*less than 1"),
        ({"image": {"lora": {"rank": 4}}}, r"model.towers.image.lora.rank: unknown key"),
        (
            {"image": {"trainable": {"last_blocks": -1}}},
            r"image.trainable.last_blocks: .*>= 0|greater",
        ),
        ({"image": {"merge_lora": True}}, r"model.towers.image: .*merge_lora: true needs lora"),
        (
            {"image": {"lora": {"r": 2}, "trainable": {"last_blocks": 1}}},
            r"model.towers.image: lora and trainable both choose what trains",
        ),
        (
            {"image": {"lora": {"r": 2}}, "freeze": ["image"]},
            r"model.freeze: names 'image' but model.towers.image.lora trains part of it",
        ),
    ],
)
def test_bad_tuning_settings_are_one_line_config_errors(change: dict, message: str) -> None:
    config = {
        "model": {
            "towers": {"image": dict(TINY_VIT), "labs": {"type": "tabular", "in_features": 2}}
        },
        "train": {},
    }
    config["train"].update(change.get("train", {}))
    config["model"]["towers"]["image"].update(change.get("image", {}))
    if "freeze" in change:
        config["model"]["freeze"] = change["freeze"]
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("tower", "message"),
    [
        (
            {**TINY_VIT, "lora": {"targets": ["c_fc", "qkv"]}},
            r"lora.targets: qkv name no module LoRA can adapt; available: .*c_fc.*c_proj",
        ),
        (
            {"type": "tabular", "in_features": 2, "lora": {}},
            r"model.towers.m.lora.targets: this TabularTower has no default LoRA .*from: 0, 3",
        ),
        (
            {**TINY_VIT, "trainable": {"last_blocks": 4}},
            r"model.towers.m.trainable.last_blocks: 4 but the tower has 3 blocks; use 0..3",
        ),
        (
            {"type": "tabular", "in_features": 2, "trainable": {"last_blocks": 1}},
            r"model.towers.m.trainable.last_blocks: this TabularTower has no stack of blocks",
        ),
    ],
)
def test_settings_that_need_the_built_tower_fail_when_it_is_built(
    tower: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _model({"m": tower, "labs": {"type": "tabular", "in_features": 2}})
    assert "\n" not in str(caught.value)
