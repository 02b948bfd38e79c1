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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from mmalign.errors import ConfigError, config_error
from mmalign.registry import TOWERS
from mmalign.towers.tuning import LoraSettings, TrainableConfig, apply_tuning, check_tuning


class TowerConfig(BaseModel):
    """Base of every tower's own config; ``type`` picks the tower. ``trainable``, ``lora``
    and ``merge_lora`` choose what of it trains (:mod:`mmalign.towers.tuning`)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    trainable: TrainableConfig | None = None
    lora: LoraSettings | None = None
    merge_lora: bool = False

    @model_validator(mode="after")
    def _tuning(self) -> TowerConfig:
        check_tuning(self)
        return self


class Tower(nn.Module):
    """Base class of modality towers.

    Subclasses set ``config_class`` (a :class:`TowerConfig` subclass) and ``width`` (the size
    of the vectors ``forward`` returns), and implement ``preprocess``, ``collate`` and
    ``forward``. Towers that keep files beside their weights (tokenizers, SentencePiece
    models, a Hugging Face config) implement ``save_files``: ``save_pretrained`` hands each
    tower its own directory (``<save dir>/<modality>``), writes the returned config updates
    into ``config.json`` and, on ``from_pretrained``, builds the tower again with
    ``base_dir`` set to that directory, then loads all weights from ``model.safetensors``.
    """

    config_class: ClassVar[type[TowerConfig]] = TowerConfig
    width: int
    pretrained_logit_scale: tuple[str, float] | None = None
    """``(checkpoint file, logit_scale)`` when the tower's weights came from a CLIP checkpoint
    holding a temperature (``model.logit_scale_init`` may carry it over)."""

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
        """Copy side files (tokenizers, ...) into ``directory`` (it exists); returns config
        updates that point at the copies (paths relative to ``directory``). Weights are not
        side files: a saved model stores every tower's weights in ``model.safetensors``, so
        towers that load a ``checkpoint`` return ``{"checkpoint": None}``."""
        return {}

    def read_checkpoint(self, path: str, key: str = "checkpoint") -> dict[str, torch.Tensor]:
        """Read a state dict from a local ``.safetensors`` file or a torch file (loaded with
        ``weights_only=True``; a ``{"state_dict": ...}`` wrapper and DDP's ``module.``
        prefix are unwrapped). ``key`` is the config field that named the file."""
        file = self.resolve_path(path)
        where = f"{self.field}.{key}"
        if not file.is_file():
            raise ConfigError(f"{where}: checkpoint file {file} does not exist")
        try:
            if file.suffix == ".safetensors":
                state = safetensors.torch.load_file(str(file))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any reader failure: corrupt file, pickle with code, ...
            raise ConfigError(f"{where}: cannot read checkpoint {file}: {error}") from error
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state:
            raise ConfigError(f"{where}: {file} does not hold a state dict of tensors")
        return {name.removeprefix("module."): value for name, value in state.items()}

    def load_weights(
        self, module: nn.Module, state: dict[str, torch.Tensor], key: str = "checkpoint"
    ) -> None:
        """Load ``state`` into ``module`` strictly; on any missing or unexpected key or shape
        mismatch raise a :class:`ConfigError` naming the field and the offending keys."""
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{name} {tuple(state[name].shape)} vs model {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if name in state and state[name].shape != tensor.shape
        ]
        problems = [
            f"{label} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            for label, names in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if names
        ]
        if problems:
            raise ConfigError(
                f"{self.field}.{key}: checkpoint does not match the configured architecture; "
                + "; ".join(problems)
                + ". Check that the tower config (model name, sizes) is the one it was "
                "trained with."
            )
        module.load_state_dict(state, strict=True)

    def batch_size_of(self, inputs: Any) -> int:
        """Number of samples in a collated batch input."""
        if isinstance(inputs, torch.Tensor):
            return int(inputs.shape[0])
        if isinstance(inputs, dict):
            first = next(iter(inputs.values()))
            return int(first.shape[0])
        return int(getattr(inputs, "num_graphs", len(inputs)))


@contextmanager
def running_batch_norm(module: nn.Module, when: bool) -> Iterator[None]:
    """Inside the block (only ``when`` true), the training BatchNorm layers of ``module``
    normalize with their running statistics and leave them unchanged: for a training
    sub-batch with one value per channel (one image, one single-node graph), whose batch
    statistics do not exist.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> with running_batch_norm(net, when=True):
        ...     net(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    layers = [
        layer
        for layer in module.modules()
        if when and isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
    ]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()


def register_tower(name: str) -> Callable[[type[Tower]], type[Tower]]:
    """Class decorator: make a tower available as ``type: name`` in configs.

    Example:
        >>> @register_tower("constant_demo")  # doctest: +SKIP
        ... class ConstantTower(Tower): ...
    """
    return TOWERS.register(name)


def build_tower(
    config: dict[str, Any], field: str = "tower", base_dir: str | Path | None = None
) -> Tower:
    """Build a tower from its config dict (``type`` plus the tower's own keys).

    ``field`` is the dotted config location used in error messages;
    ``base_dir`` resolves relative file paths (a saved model's directory).
    """
    cls = TOWERS.get(config.get("type"), f"{field}.type")
    try:
        parsed = cls.config_class.model_validate(config)
    except ValidationError as error:
        raise config_error(error, field, "tower config") from None
    tower = cls(parsed, field=field, base_dir=Path(base_dir) if base_dir is not None else None)
    apply_tuning(tower, field)
    return tower
