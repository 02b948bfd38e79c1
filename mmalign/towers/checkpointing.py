"""Gradient checkpointing of a tower (``train.gradient_checkpointing: true``).

In training, a checkpointed block keeps only its input and recomputes its activations in
the backward pass: less memory for some more compute, the same loss and gradients.

- open_clip towers (ViT, the text transformer, timm trunks that support it): open_clip's
  ``set_grad_checkpointing(True)``;
- Hugging Face towers (text, audio): ``activation_checkpointing_enable`` (transformers 5's
  name of ``gradient_checkpointing_enable``; non-reentrant);
- the audio transformer: each layer through ``torch.utils.checkpoint.checkpoint``
  (``use_reentrant=False``; dropout draws the same numbers when recomputed).

The other towers are left as they are (a documented no-op): the audio CNN, the tabular MLP
and the GNNs keep small activations, and their BatchNorm layers would update the running
statistics a second time when recomputed; open_clip's ModifiedResNet has no checkpointing
either. :func:`enable_gradient_checkpointing` says whether it applied.

Example:
    >>> from mmalign.towers import build_tower
    >>> enable_gradient_checkpointing(build_tower({"type": "audio", "width": 16, "heads": 2}))
    True
    >>> enable_gradient_checkpointing(build_tower({"type": "tabular", "in_features": 2}))
    False
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


def enable_gradient_checkpointing(tower: nn.Module) -> bool:
    """Turn on gradient checkpointing in ``tower`` where its kind supports it (module
    docstring); whether it did."""
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
