"""Memory and speed settings applied to a built model: ``train.gradient_checkpointing`` and
``train.compile``.

Gradient checkpointing is switched on per tower as its kind allows
(:mod:`mmalign.towers.grad_checkpointing`). ``compile`` runs ``torch.compile`` on each tower in
place (``nn.Module.compile``; ``true``: the default backend, inductor; a string: that
backend), not on the loss: the model's parameter names, and so its
checkpoints and saved ``model.safetensors``, stay as without it (no ``_orig_mod.`` prefix).

Example:
    >>> from mmalign.config import ConfigError, TrainConfig
    >>> from mmalign.model import AlignmentModel
    >>> model = AlignmentModel.from_config({"dim": 4, "towers": {
    ...     "a": {"type": "audio", "width": 8, "heads": 2},
    ...     "b": {"type": "tabular", "in_features": 2}}})
    >>> apply_memory_savers(model, TrainConfig(gradient_checkpointing=True))
    {'gradient_checkpointing': ['a'], 'compiled': []}
"""

from __future__ import annotations

from mmalign.config import ConfigError, TrainConfig
from mmalign.model import AlignmentModel


def apply_memory_savers(model: AlignmentModel, config: TrainConfig) -> dict[str, list[str]]:
    """Gradient checkpointing and compilation of ``model``'s towers as ``config`` says, in
    place; the modalities each one applied to."""
    applied: dict[str, list[str]] = {"gradient_checkpointing": [], "compiled": []}
    options = {"backend": _backend(config.compile)} if isinstance(config.compile, str) else {}
    for name, tower in model.towers.items():
        if config.gradient_checkpointing and tower.enable_gradient_checkpointing():
            applied["gradient_checkpointing"].append(name)
        if config.compile:
            tower.compile(**options)
            applied["compiled"].append(name)
    return applied


def _backend(name: str) -> str:
    """``name`` when torch.compile knows it as a backend, else a :class:`ConfigError`."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ConfigError(
            f"train.compile: {name!r} is not a torch.compile backend; use true (inductor) "
            f"or one of {', '.join(known)}"
        )
    return name
