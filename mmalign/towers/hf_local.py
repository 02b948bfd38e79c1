"""A tower's Hugging Face model from a local folder (``path:``), never downloaded.

The folder holds the model's ``config.json`` and, for a model trained elsewhere, its
weights; a saved mmalign model's tower folder holds only the config (the weights live in the
model's ``model.safetensors``), so the model is then built from its config and loaded with
the rest of the tower. Used by the towers' ``encoder: hf`` / ``backend: hf`` options.

Example:
    >>> import tempfile, transformers
    >>> folder = tempfile.mkdtemp()
    >>> transformers.PatchTSTConfig(num_input_channels=2, context_length=32).save_pretrained(
    ...     folder)
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "timeseries", "encoder": "hf", "path": folder,
    ...     "channels": 2, "window": 32})
    >>> type(hf_model(tower, hf_folder(tower), "patchtst")).__name__
    'PatchTSTModel'
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from mmalign.towers.base import Tower

from mmalign.errors import ConfigError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hf_folder(tower: Tower) -> Path:
    """The tower's ``path:`` (relative to a saved model's folder), checked to hold a
    ``config.json``."""
    directory = tower.resolve_path(str(getattr(tower.config, "path", "")))
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{tower.field}.path: {directory} is not a Hugging Face model directory "
            "(no config.json); save one with model.save_pretrained(dir)"
        )
    return directory


def has_weights(directory: Path) -> bool:
    """Whether ``directory`` holds weights (else only a config)."""
    return any((directory / name).is_file() for name in WEIGHT_FILES)


def hf_config(tower: Tower, directory: Path, model_type: str | None) -> PretrainedConfig:
    """The folder's config, which must be of ``model_type`` unless that is ``None`` (one
    line naming ``path``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if model_type is not None and config.model_type != model_type:
        raise ConfigError(
            f"{tower.field}.path: {directory} holds a {config.model_type!r} model; a "
            f"{tower.config.type} tower's encoder: hf takes {model_type!r}"
        )
    return config


def hf_model(
    tower: Tower,
    directory: Path,
    model_type: str | None,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """The folder's ``AutoModel`` in float32, with ``config`` (default: the folder's, checked
    to be ``model_type``): its weights if it has any, else freshly initialized."""
    from transformers import AutoModel

    config = config if config is not None else hf_config(tower, directory, model_type)
    if has_weights(directory):
        return AutoModel.from_pretrained(
            directory, config=config, dtype=torch.float32, local_files_only=True
        )
    return AutoModel.from_config(config, dtype=torch.float32)


def checked_size(tower: Tower, field: str, value: int, model_value: int, model_key: str) -> None:
    """Refuse a model whose ``model_key`` differs from the tower's ``field`` (one line)."""
    if value != model_value:
        raise ConfigError(
            f"{tower.field}.{field}: {value}, but the model at {tower.field}.path takes "
            f"{model_value} ({model_key}); set {field}: {model_value}"
        )
