"""Fine-tuning a pretrained tower: last_blocks, LoRA (peft) with merged and unmerged saves,
layer-wise learning-rate decay, and the errors of their config keys."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from finetune_support import (
    TINY_AUDIO,
    TINY_OPEN_CLIP_TEXT,
    TINY_VIT,
    hf_text,
    parameters,
    raw_samples,
    train_steps,
)
from safetensors.torch import load_file

from mmalign.config import ConfigError, TrainConfig
from mmalign.model import AlignmentModel
from mmalign.training.optim import build_optimizer


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
