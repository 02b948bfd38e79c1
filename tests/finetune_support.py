"""Tiny towers of each kind and their inputs, for the fine-tuning and memory-saver tests
(test helper; no test here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.model import AlignmentModel
from mmalign.towers import Tower
from tests.towers.test_image_text import make_hf_text

TINY_VIT = {
    "type": "image",
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
}
TINY_OPEN_CLIP_TEXT = {"type": "text", "width": 32, "heads": 2, "layers": 2, "context_length": 8}
TINY_AUDIO = {"type": "audio", "width": 16, "heads": 2, "layers": 2, "clip_seconds": 0.25}
CAPTIONS = ["a handwritten seven", "the digit three", "le chiffre sept", "die ziffer sieben"]


def hf_text(directory: Path) -> dict[str, Any]:
    """A tiny BERT text tower config (the model saved under ``directory``)."""
    return {"type": "text", "backend": "hf", "path": str(make_hf_text(directory))}


def raw_samples(tower: Tower, count: int = 4) -> list[Any]:
    """``count`` deterministic raw samples of ``tower``'s modality."""
    rng = np.random.default_rng(0)
    kind = tower.config.type
    if kind == "image":
        return [rng.integers(0, 255, (20, 20, 3), dtype=np.uint8) for _ in range(count)]
    if kind == "text":
        return CAPTIONS[:count]
    if kind == "audio":
        return [(rng.normal(size=4000).astype(np.float32), 16000) for _ in range(count)]
    return [rng.normal(size=tower.config.in_features).tolist() for _ in range(count)]


def inputs_of(model: AlignmentModel, count: int = 4) -> dict[str, Any]:
    """Collated inputs of every modality of ``model``."""
    return {
        name: tower.collate([tower.preprocess(raw) for raw in raw_samples(tower, count)])
        for name, tower in model.towers.items()
    }


def train_steps(model: AlignmentModel, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` optimizer steps of the model's contrastive loss on fixed inputs."""
    inputs = inputs_of(model)
    model.train()
    for _ in range(steps):
        loss = model.loss(model(inputs)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
