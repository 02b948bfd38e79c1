"""The Tower contract and the registry that maps a config's ``type:`` to a tower class.

A tower turns raw samples of one modality into vectors ``[B, width]``; the model adds the
projection to the shared space. Three steps:

- ``preprocess(raw) -> item``: one raw sample to a model-ready item; pure, runs in
  data-loader workers.
- ``collate(items) -> inputs``: a list of items to one batch input.
- ``forward(inputs) -> Tensor[B, width]``: the encoder.

Adding a modality is one file that subclasses :class:`Tower` and decorates it with
``@register_tower("name")``.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "tabular", "in_features": 3}, field="model.towers.labs")
    >>> tower(tower.collate([tower.preprocess([1.0, 2.0, 3.0])])).shape[0]
    1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from mmalign.config import ConfigError


class TowerConfig(BaseModel):
    """Base of every tower's own config; ``type`` picks the tower."""

    model_config = ConfigDict(extra="forbid")
    type: str


class Tower(nn.Module):
    """Base class of modality towers.

    Subclasses set ``config_class`` (a :class:`TowerConfig` subclass) and ``width`` (the size
    of the vectors ``forward`` returns), and implement ``preprocess``, ``collate`` and
    ``forward``. Towers that keep files beside their weights (tokenizers, SentencePiece
    models) implement ``save_files`` and ``from_saved``.
    """

    config_class: ClassVar[type[TowerConfig]] = TowerConfig
    width: int

    def __init__(
        self, config: TowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.field = field
        self.base_dir = base_dir
        self.augment = False

    def resolve_path(self, path: str) -> Path:
        """A config path, relative to ``base_dir`` (a saved model's directory) when set."""
        candidate = Path(path)
        if not candidate.is_absolute() and self.base_dir is not None:
            candidate = self.base_dir / candidate
        return candidate

    def preprocess(self, raw: Any) -> Any:
        """One raw sample to a model-ready item (runs in data-loader workers)."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> Any:
        """A list of preprocessed items to one batch input."""
        raise NotImplementedError

    def set_augment(self, enabled: bool) -> None:
        """Turn train-time augmentation in ``preprocess`` on or off (off by default)."""
        self.augment = enabled

    def save_files(self, directory: Path) -> dict[str, Any]:
        """Copy side files (tokenizers, ...) into ``directory``; returns config updates
        that point at the copies (paths relative to ``directory``)."""
        return {}

    def batch_size_of(self, inputs: Any) -> int:
        """Number of samples in a collated batch input."""
        if isinstance(inputs, torch.Tensor):
            return int(inputs.shape[0])
        if isinstance(inputs, dict):
            first = next(iter(inputs.values()))
            return int(first.shape[0])
        return int(getattr(inputs, "num_graphs", len(inputs)))

    def move_to(self, inputs: Any, device: torch.device) -> Any:
        """Move a collated batch input to ``device``."""
        if isinstance(inputs, torch.Tensor | nn.Module) or hasattr(inputs, "to"):
            return inputs.to(device)
        if isinstance(inputs, dict):
            return {key: self.move_to(value, device) for key, value in inputs.items()}
        return inputs


TOWERS: dict[str, type[Tower]] = {}


def register_tower(name: str) -> Callable[[type[Tower]], type[Tower]]:
    """Class decorator: make a tower available as ``type: name`` in configs."""

    def decorate(cls: type[Tower]) -> type[Tower]:
        TOWERS[name] = cls
        return cls

    return decorate


def build_tower(
    config: dict[str, Any], field: str = "tower", base_dir: str | Path | None = None
) -> Tower:
    """Build a tower from its config dict (``type`` plus the tower's own keys).

    ``field`` is the dotted config location used in error messages;
    ``base_dir`` resolves relative file paths (a saved model's directory).
    """
    from mmalign import towers as _  # noqa: F401  (registers the built-in towers)

    kind = config.get("type")
    if kind not in TOWERS:
        known = ", ".join(sorted(TOWERS))
        raise ConfigError(f"{field}.type: unknown tower type {kind!r}; known types: {known}")
    cls = TOWERS[kind]
    try:
        parsed = cls.config_class.model_validate(config)
    except ValidationError as error:
        problems = "; ".join(
            f"{field}.{'.'.join(str(p) for p in item['loc'])}: "
            + ("unknown key" if item["type"] == "extra_forbidden" else item["msg"])
            for item in error.errors()
        )
        raise ConfigError(f"invalid tower config: {problems}") from None
    return cls(parsed, field=field, base_dir=Path(base_dir) if base_dir is not None else None)
