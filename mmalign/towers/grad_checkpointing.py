"""Gradient checkpointing of a tower (``train.gradient_checkpointing: true``), as the tower
decides in :meth:`mmalign.towers.Tower.enable_gradient_checkpointing`.

In training, a checkpointed block keeps only its input and recomputes its activations in
the backward pass: less memory for some more compute, the same loss and gradients.

- by default, each of the tower's blocks (``Tower.blocks()``) runs through
  ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False``; dropout draws the same
  numbers when recomputed), unless a block holds BatchNorm (recomputing would update its
  running statistics a second time);
- towers built on a library use the library's own switch (:func:`library_checkpointing`):
  open_clip's ``set_grad_checkpointing(True)`` (ViT, the text transformer, timm trunks that
  support it), ``activation_checkpointing_enable`` for Hugging Face models (transformers 5's
  name of ``gradient_checkpointing_enable``; non-reentrant), each layer of an
  ``nn.TransformerEncoder`` (the audio transformer) through ``checkpoint``.

The audio CNN, the tabular MLP and the GNNs are left as they are (a documented no-op): they
keep small activations and their BatchNorm layers would update the running statistics a
second time when recomputed; open_clip's ModifiedResNet has no checkpointing either.

Example:
    >>> from mmalign.towers import build_tower
    >>> build_tower({"type": "audio", "width": 16, "heads": 2}).enable_gradient_checkpointing()
    True
    >>> build_tower({"type": "tabular", "in_features": 2}).enable_gradient_checkpointing()
    False
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmalign.towers.layout import Block


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's ``forward``, through ``checkpoint`` when training with gradients."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_module(module: nn.Module) -> None:
    """Run ``module`` through ``torch.utils.checkpoint`` from now on (its parameter names
    are unchanged; a deep copy stays checkpointed).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> checkpoint_module(layer)
        >>> layer(torch.ones(1, 2, requires_grad=True)).shape
        torch.Size([1, 2])
    """
    module.forward = types.MethodType(_checkpointed_forward, module)


def checkpoint_blocks(blocks: list[Block]) -> bool:
    """Checkpoint every module of ``blocks`` unless one holds BatchNorm; whether it did.

    Example:
        >>> checkpoint_blocks([[nn.Linear(2, 2)], [nn.Linear(2, 2)]])
        True
        >>> checkpoint_blocks([[nn.BatchNorm1d(2)]])
        False
    """
    modules = [module for block in blocks for module in block]
    batch_norm = nn.modules.batchnorm._BatchNorm
    if not modules or any(isinstance(m, batch_norm) for b in modules for m in b.modules()):
        return False
    for module in modules:
        checkpoint_module(module)
    return True


def library_checkpointing(tower: nn.Module) -> bool:
    """Turn on the checkpointing of the library ``tower`` is built on (module docstring);
    whether it applied (``False`` without such a library model)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import TextTransformer, VisionTransformer
    from transformers import PreTrainedModel

    for module in tower.modules():
        if isinstance(module, VisionTransformer | TextTransformer | TimmModel):
            module.set_grad_checkpointing(True)
            return True
        if isinstance(module, PreTrainedModel):
            if not module.supports_gradient_checkpointing:
                return False
            module.activation_checkpointing_enable({"use_reentrant": False})
            return True
        if isinstance(module, nn.TransformerEncoder):
            for layer in module.layers:
                checkpoint_module(layer)
            return True
    return False
