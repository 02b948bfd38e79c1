"""Gradient checkpointing and torch.compile of towers: same loss and gradients as without,
checkpointing really recomputes, saved weights keep their names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters

from mmalign.config import ConfigError, TrainConfig
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.training import train
from mmalign.training.memory_savers import apply_memory_savers
from tests.finetune_support import TINY_AUDIO, TINY_OPEN_CLIP_TEXT, TINY_VIT, hf_text, raw_samples
from tests.train_support import metrics, tiny_config, write_shards

KINDS = {
    "open_clip-vit": lambda tmp: TINY_VIT,
    "open_clip-text": lambda tmp: TINY_OPEN_CLIP_TEXT,
    "hf-text": lambda tmp: hf_text(tmp / "bert"),
    "audio-transformer": lambda tmp: {**TINY_AUDIO, "dropout": 0.2},  # recomputed dropout
}


def _forward_backward(tower: nn.Module, inputs: object) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)
    out = tower(inputs)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {
        n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_tower_recomputes_and_matches(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = build_tower(KINDS[kind](tmp_path), field="model.towers.m").train()
    checkpointed = copy.deepcopy(plain)
    assert checkpointed.enable_gradient_checkpointing()
    inputs = plain.collate([plain.preprocess(raw) for raw in raw_samples(plain)])

    calls = {"plain": 0, "checkpointed": 0}
    for name, tower in (("plain", plain), ("checkpointed", checkpointed)):
        first_block = tower.blocks()[0][0]
        last_linear = [m for m in first_block.modules() if isinstance(m, nn.Linear)]
        last_linear[-1].register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)
        )
    out_plain, grads_plain = _forward_backward(plain, inputs)
    out_checkpointed, grads_checkpointed = _forward_backward(checkpointed, inputs)

    assert calls == {"plain": 1, "checkpointed": 2}  # the block ran again in backward
    torch.testing.assert_close(out_checkpointed, out_plain, rtol=0, atol=1e-6)
    assert grads_checkpointed.keys() == grads_plain.keys() and len(grads_plain) > 10
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-6)


def test_towers_without_checkpointing_say_so() -> None:
    """Documented no-op: small activations, BatchNorm would count its statistics twice."""
    for config in (
        {"type": "tabular", "in_features": 3},
        {"type": "graph", "in_features": 2, "hidden": 8},
        {"type": "audio", "encoder": "cnn"},
    ):
        assert not build_tower(config).enable_gradient_checkpointing()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), "train", shards=1, per_shard=32)


def test_compiled_towers_train_like_eager_and_save_the_same_names(
    tmp_path: Path, shards: str
) -> None:
    """aot_eager: dynamo + AOTAutograd without inductor's C++ code generation, which takes
    minutes on two busy cores (benchmarks/ measures inductor)."""
    counters.clear()
    runs = {}
    for name, compiled in (("eager", False), ("compiled", "aot_eager")):
        train_section = {"steps": 2, "compile": compiled}
        train(tiny_config(tmp_path / name, shards, train=train_section))
        runs[name] = tmp_path / name
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the towers
    losses = {name: [r["train/loss"] for r in metrics(run)] for name, run in runs.items()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    eager = load_file(runs["eager"] / "model" / "model.safetensors")
    compiled = load_file(runs["compiled"] / "model" / "model.safetensors")
    assert compiled.keys() == eager.keys()
    assert not any("_orig_mod" in key for key in compiled)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5)


def test_compile_true_is_inductor_and_an_unknown_backend_is_named() -> None:
    model = AlignmentModel.from_config(
        {
            "dim": 4,
            "towers": {
                "a": {"type": "tabular", "in_features": 2},
                "b": {"type": "tabular", "in_features": 2},
            },
        }
    )
    assert apply_memory_savers(model, TrainConfig(compile=True))["compiled"] == ["a", "b"]
    assert model.towers["a"]._compiled_call_impl is not None  # compiled lazily, at first call
    assert model.state_dict().keys() == AlignmentModel.from_config(model.config).state_dict().keys()
    with pytest.raises(
        ConfigError, match=r"train.compile: 'nope' is not a torch.compile backend;.*inductor"
    ):
        apply_memory_savers(model, TrainConfig(compile="nope"))
