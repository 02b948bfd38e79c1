"""Which parameters of a tower train: ``trainable: {last_blocks: N}`` or ``lora: {...}``.

Both are keys of every tower's config (``model.towers.X``), applied by
:func:`mmalign.towers.build_tower` once the tower holds its pretrained weights:

- ``trainable: {last_blocks: N}`` freezes the tower except its last ``N`` blocks and its head
  (final norms, pooling, open_clip's projection); what a block is, per tower kind, is in
  :mod:`mmalign.towers.layout`. ``N: 0`` trains the head only.
- ``lora: {r, alpha, dropout, targets}`` adds peft LoRA adapters and freezes the rest of the
  tower (:mod:`mmalign.towers.lora`); ``merge_lora: true`` folds them into the weights when
  the model is saved (``AlignmentModel.save_pretrained``), so the saved model loads without
  peft. Unmerged, the saved model holds the adapters and loads back with peft.

The model's projection into the shared space trains in every case. ``model.freeze`` freezes
a whole tower; naming a tower there and giving it ``trainable`` or ``lora`` is refused.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "audio", "layers": 2, "width": 16, "heads": 2,
    ...     "trainable": {"last_blocks": 1}}, field="model.towers.audio")
    >>> tower.encoder.blocks.layers[0].linear1.weight.requires_grad
    False
    >>> tower.encoder.blocks.layers[1].linear1.weight.requires_grad
    True
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmalign.towers.layout import train_last_blocks
from mmalign.towers.lora import LoraSettings, inject_lora


class TrainableConfig(BaseModel):
    """``model.towers.X.trainable``: the part of a pretrained tower that trains."""

    model_config = ConfigDict(extra="forbid")
    last_blocks: int = Field(ge=0)
    """Blocks counted from the output that train (with the head); the others are frozen."""


def check_tuning(config: Any) -> None:
    """Raise ``ValueError`` for contradictory tuning keys of one tower config (pydantic puts
    it under the tower's field)."""
    if config.lora is not None and config.trainable is not None:
        raise ValueError(
            "lora and trainable both choose what trains (LoRA freezes the base weights); keep one"
        )
    if config.merge_lora and config.lora is None:
        raise ValueError("merge_lora: true needs lora: {r: ...}; remove merge_lora")


def apply_tuning(tower: nn.Module, field: str) -> None:
    """Freeze ``tower`` as its config's ``trainable`` / ``lora`` say (nothing without them)."""
    config = tower.config
    if config.trainable is not None:
        train_last_blocks(tower, config.trainable.last_blocks, field)
    if config.lora is not None:
        inject_lora(tower, config.lora, field)


__all__ = ["LoraSettings", "TrainableConfig", "apply_tuning", "check_tuning"]
