"""AdamW with decay-free parameter groups and a warmup + cosine (or constant) schedule.

Weight decay is applied to weight matrices and kernels only: biases, normalization layers,
embeddings (token, positional, class tokens) and the temperature / bias of the objective are
left undecayed, as CLIP and open_clip do.

Example:
    >>> import torch
    >>> from mmalign.config import TrainConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    >>> [len(group["params"]) for group in optimizer.param_groups]
    [1, 3]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from mmalign.config import TrainConfig
from mmalign.towers import Tower
from mmalign.towers.layout import tower_layout

_NORM_AND_EMBEDDING_MODULES = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    nn.RMSNorm,
)
_UNDECAYED_NAME_PARTS = (
    "logit_scale",
    "logit_bias",
    "pos_embed",
    "positional_embedding",
    "position_embedding",
    "class_embedding",
    "cls_token",
    "mask_token",
    "reg_token",
)


def _is_undecayed(module: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    """Biases, vectors, norms, embeddings and temperatures get no weight decay."""
    if parameter.ndim < 2 or isinstance(module, _NORM_AND_EMBEDDING_MODULES):
        return True
    return any(part in name for part in _UNDECAYED_NAME_PARTS)


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split into (decayed, undecayed); frozen ones are left out."""
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            target = undecayed if _is_undecayed(module, name, parameter) else decayed
            target.append(parameter)
    return decayed, undecayed


def layer_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """Learning-rate factor per tower parameter (by ``id``) under layer-wise decay: with
    ``n`` blocks, ``decay ** (n + 1 - depth)``, depth 0 for the stem, ``i + 1`` for block
    ``i``, ``n + 1`` for the head (the tower's ``blocks()``, :mod:`mmalign.towers.layout`).
    Towers without blocks,
    the projections and the temperature are left out (factor 1).

    Example:
        >>> from mmalign.model import AlignmentModel
        >>> model = AlignmentModel.from_config({"dim": 4, "towers": {"a": {"type": "audio",
        ...     "layers": 2, "width": 8, "heads": 2}}})
        >>> scales = layer_scales(model, 0.5)
        >>> [scales[id(p)] for p in (model.towers["a"].encoder.embed.weight,
        ...     model.towers["a"].encoder.blocks.layers[1].linear1.weight,
        ...     model.towers["a"].encoder.norm.weight)]
        [0.125, 0.5, 1.0]
    """
    scales: dict[int, float] = {}
    towers = getattr(model, "towers", None)
    for tower in towers.values() if isinstance(towers, nn.ModuleDict) else []:
        layout = tower_layout(tower, tower.blocks()) if isinstance(tower, Tower) else None
        if layout is None:
            continue
        top = len(layout.blocks) + 1
        for name, parameter in tower.named_parameters():
            scales[id(parameter)] = decay ** (top - layout.depth(name))
    return scales


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over decayed weights, then undecayed biases/norms/embeddings (torch's fused
    implementation); with ``train.layer_decay`` one such pair per learning-rate factor
    (:func:`layer_scales`), the full rate first. Each group records its ``lr_scale`` and
    whether it ``decays`` (for resuming with new settings)."""
    decayed, undecayed = split_decay(model)
    if not decayed and not undecayed:
        raise ValueError(
            "the model has no trainable parameters; check model.freeze and the tower configs"
        )
    scales = layer_scales(model, config.layer_decay) if config.layer_decay else {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for decays, parameters in ((True, decayed), (False, undecayed)):
        for parameter in parameters:
            groups.setdefault((scales.get(id(parameter), 1.0), decays), []).append(parameter)
    param_groups = [
        {
            "params": parameters,
            "lr": config.lr * scale,
            "lr_scale": scale,
            "decays": decays,
            "weight_decay": config.weight_decay if decays else 0.0,
        }
        for (scale, decays), parameters in sorted(groups.items(), key=lambda item: -item[0][0])
    ]
    # torch's fused kernel (CPU and GPU) is several times faster than the per-tensor loop
    fused = all(p.is_floating_point() for p in decayed + undecayed)
    return torch.optim.AdamW(
        param_groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> LambdaLR:
    """Linear warmup over ``train.warmup`` steps, then cosine decay to zero (or constant)."""
    if config.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup)
    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=config.warmup, num_training_steps=total_steps
    )
