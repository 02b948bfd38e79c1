"""LoRA adapters in a tower through ``peft`` (``model.towers.X.lora``), and merging them.

:func:`inject_lora` puts peft's LoRA layers into the tower's modules named by ``targets``
(matched as peft matches them: a module whose name is a target or ends in ``.target``) and
freezes every other parameter of the tower; the model's projection stays trainable. Default
targets, per tower kind:

- open_clip towers (ViT image tower, open_clip text tower): ``c_fc`` and ``c_proj``, the
  MLP of every block;
- Hugging Face towers: peft's own default for the model type (``query``/``value`` for BERT);
- the audio transformer: ``linear1`` and ``linear2``, the MLP of every layer.

Attention in open_clip and the audio transformer is ``nn.MultiheadAttention``, which uses
its fused q/k/v ``in_proj_weight`` and its ``out_proj.weight`` directly, never calling
``out_proj`` as a module: a LoRA on ``out_proj`` alone would never run, so that target is
refused. Name the attention module itself (``attn``, ``self_attn``) to adapt it: peft's
experimental LoRA for ``nn.MultiheadAttention`` adapts q/k/v and ``out_proj`` by adding the
update to the weights for each forward and subtracting it after, so the frozen base weights
drift by float rounding (about 1e-8 after a few steps; merged saves are unaffected). That is
why the defaults leave attention out.

Other towers (CNNs, GNNs, the tabular MLP, timm trunks) need ``targets``; a name matching no
adaptable module (``Linear``, ``Conv``, ``Embedding``, ``MultiheadAttention``) is an error
that lists the names there are. :func:`merge_lora` folds the adapters into the base weights
and removes the peft layers, so the module's state dict has its original keys again.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "audio", "width": 16, "heads": 2,
    ...     "lora": {"r": 2}}, field="model.towers.audio")
    >>> sorted({name.split(".")[-4] for name, p in tower.named_parameters() if p.requires_grad})
    ['linear1', 'linear2']
    >>> merge_lora(tower)
    >>> any("lora" in name for name in tower.state_dict())
    False
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmalign.config.tower import LoraSettings
from mmalign.errors import ConfigError

OPEN_CLIP_TARGETS = ["c_fc", "c_proj"]
AUDIO_TRANSFORMER_TARGETS = ["linear1", "linear2"]
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def default_targets(tower: nn.Module) -> list[str] | None:
    """The default LoRA targets of ``tower``'s kind, ``None`` when it has none.

    Example:
        >>> from mmalign.towers import build_tower
        >>> default_targets(build_tower({"type": "tabular", "in_features": 2})) is None
        True
    """
    from open_clip.transformer import TextTransformer, VisionTransformer
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers import PreTrainedModel

    for module in tower.modules():
        if isinstance(module, VisionTransformer | TextTransformer):
            return list(OPEN_CLIP_TARGETS)
        if isinstance(module, PreTrainedModel):
            found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(module.config.model_type)
            return list(found) if found else None
        if isinstance(module, nn.TransformerEncoder):
            return list(AUDIO_TRANSFORMER_TARGETS)
    return None


def adaptable_names(tower: nn.Module) -> list[str]:
    """The last name part of each module LoRA can adapt, sorted, without repeats."""
    return sorted(
        {name.rpartition(".")[2] for name, m in tower.named_modules() if isinstance(m, _ADAPTABLE)}
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def inject_lora(tower: nn.Module, settings: LoraSettings, field: str) -> list[str]:
    """Add LoRA adapters to ``tower`` in place and freeze its other parameters; returns the
    targets used. ``field`` names the tower's config, for errors."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError(
            f"{field}.lora: LoRA adapters need the peft package, which is not installed; "
            "pip install 'mmalign[lora]' (or peft)"
        ) from None

    targets = settings.targets or default_targets(tower)
    available = adaptable_names(tower)
    if targets is None:
        raise ConfigError(
            f"{field}.lora.targets: this {type(tower).__name__} has no default LoRA targets; "
            f"name the modules to adapt, from: {', '.join(available)}"
        )
    modules = dict(tower.named_modules())
    names = [name for name, module in modules.items() if isinstance(module, _ADAPTABLE)]
    bypassed = [  # nn.MultiheadAttention reads out_proj's weight without calling it
        t
        for t in targets
        for name in names
        if _matches(name, t) and isinstance(modules[name.rpartition(".")[0]], nn.MultiheadAttention)
    ]
    if bypassed:
        raise ConfigError(
            f"{field}.lora.targets: {bypassed[0]} is the out_proj of an nn.MultiheadAttention, "
            "which never calls it (a LoRA there would not run); target the attention module "
            "itself (e.g. attn or self_attn) or the MLP"
        )
    unknown = [t for t in targets if not any(_matches(name, t) for name in names)]
    if unknown:
        raise ConfigError(
            f"{field}.lora.targets: {', '.join(unknown)} name no module LoRA can adapt; "
            f"available: {', '.join(available)}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft scales by a float
        lora_dropout=settings.dropout,
        target_modules=targets,
    )
    inject_adapter_in_model(config, tower)
    for module in tower.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            # its inference fast path reads linear1/linear2's weights, skipping the adapters;
            # this flag only gates that path (the module's forward is otherwise the same)
            module.activation_relu_or_gelu = False
    return targets


def merge_lora(module: nn.Module) -> None:
    """Fold every LoRA adapter of ``module`` into its base layer and put the base layer
    back in its place (in place; the parameter names are those before :func:`inject_lora`)."""
    from peft.tuners.lora import LoraLayer

    layers: list[tuple[str, Any]] = [
        (name, layer) for name, layer in module.named_modules() if isinstance(layer, LoraLayer)
    ]
    for _, layer in layers:
        if not layer.merged:
            layer.merge()
    for name, layer in reversed(layers):  # innermost first (peft nests MHA's out_proj)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.get_base_layer())
