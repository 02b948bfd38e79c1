"""The Tower contract and the registry that maps a config's ``type:`` to a tower class.

A tower turns raw samples of one modality into vectors ``[B, width]``; the model adds the
projection to the shared space. Three steps:

- ``preprocess(raw, augment=False) -> item``: one raw sample to a model-ready item; pure,
  runs in data-loader workers (``augment``: the train-time random transform).
- ``collate(items) -> inputs``: a list of items to one batch input.
- ``forward(inputs) -> Tensor[B, width]``: the encoder.

The tower owns its facts: ``blocks()`` (what ``trainable: {last_blocks: N}``,
``train.layer_decay``, gradient checkpointing and FSDP count in; :mod:`mmalign.towers.layout`),
``enable_gradient_checkpointing()`` and what export needs (``example_raw()``, the ONNX input
names and dynamic axes, ``exportable()``, ``hf_parts()``).

Adding a modality is one file that subclasses :class:`Tower`, gives it a
:class:`~mmalign.config.TowerConfig` subclass as ``config_class`` and decorates it with
``@register_tower("name")``.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "tabular", "in_features": 3}, field="model.towers.labs")
    >>> tower(tower.collate([tower.preprocess([1.0, 2.0, 3.0])])).shape[0]
    1
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from mmalign.config.tower import TowerConfig, tower_config
from mmalign.errors import ConfigError, UserError, config_error, file_problem
from mmalign.registry import TOWER_OPTIONS, TOWERS
from mmalign.towers.grad_checkpointing import checkpoint_blocks
from mmalign.towers.layout import Block, stack_blocks, train_last_blocks
from mmalign.towers.lora import inject_lora


@dataclasses.dataclass(frozen=True)
class HFParts:
    """What ``mmalign convert --to hf`` writes of a tower that came from ``transformers``:
    the model (``save_pretrained``), its tokenizer, feature extractor or video processor
    (``None``: the model takes the tower's own tensors), the pooling (``cls``, ``mean``,
    ``eos``, ``frames``, ``tokens`` or ``channels``) that turns its hidden states into a
    vector, and ``inputs``: tensors the tower applies to its inputs before the model (the
    time-series tower's per-channel ``mean`` / ``std``)."""

    model: PreTrainedModel
    processor: Any
    pooling: str
    inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


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
    config: TowerConfig
    width: int
    onnx_input: ClassVar[str] = "inputs"
    """The ONNX input name of a collated input that is one tensor (a dict's keys name
    themselves)."""
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

    def resolve_path(self, path: str) -> Path:
        """A config path, relative to ``base_dir`` (a saved model's directory) when set."""
        candidate = Path(path)
        if not candidate.is_absolute() and self.base_dir is not None:
            candidate = self.base_dir / candidate
        return candidate

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        """One raw sample to a model-ready item (runs in data-loader workers); ``augment``
        applies the tower's train-time random transform, if it has one."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> Any:
        """A list of preprocessed items to one batch input."""
        raise NotImplementedError

    def blocks(self) -> list[Block]:
        """The tower's blocks, input to output, each the modules it is made of; empty
        without a stack of blocks. Default: :func:`~mmalign.towers.layout.stack_blocks`."""
        return stack_blocks(self)

    def enable_gradient_checkpointing(self) -> bool:
        """Turn on gradient checkpointing where the tower supports it; whether it did.
        Default: each block through ``torch.utils.checkpoint``
        (:func:`~mmalign.towers.grad_checkpointing.checkpoint_blocks`)."""
        return checkpoint_blocks(self.blocks())

    def example_raw(self) -> Any:
        """A raw sample to trace an export with (ONNX); refused for towers whose collated
        input is not plain tensors."""
        kind = self.config.type
        raise UserError(
            f"a {kind} tower's inputs are not plain tensors, so ONNX cannot take them "
            f"({self.field}.type: {kind}); pick the other towers with --modality"
        )

    def onnx_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        """The dynamic axes of the ONNX inputs ``names``: the batch axis."""
        return {name: {0: "batch"} for name in names}

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """Inside the block the tower holds only ops ONNX can export (default: as it is)."""
        yield

    def hf_parts(self) -> HFParts | None:
        """The ``transformers`` model this tower wraps, for ``--to hf`` (default: none)."""
        return None

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
        problem = file_problem(file)
        if problem is not None:
            raise ConfigError(
                f"the checkpoint {file} {problem} ({where}); give the path of a local "
                "checkpoint file (mmalign never downloads weights), or leave out checkpoint "
                "for a random initialization"
            )
        state: Any
        try:
            if file.suffix == ".safetensors":
                state = safetensors.torch.load_file(str(file))
            else:
                with warnings.catch_warnings():  # torch's note on the pickle protocol
                    warnings.simplefilter("ignore", UserWarning)
                    state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any reader failure: corrupt file, pickle with code, ...
            raise ConfigError(
                f"cannot read the checkpoint {file}: {_reader_problem(error)} ({where}); pass a "
                ".safetensors file or a torch file of tensors only (a state dict)"
            ) from error
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state:
            raise ConfigError(
                f"the checkpoint {file} holds no state dict of tensors ({where}); pass the "
                "weights of this tower (a .safetensors file or a torch state dict)"
            )
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


def _reader_problem(error: Exception) -> str:
    """What a checkpoint reader's error says, in one line: of torch's paragraph on
    ``weights_only`` (a pickle holding more than tensors), only the refused part."""
    _, found, detail = str(error).partition("WeightsUnpickler error:")
    if found:
        detail = detail.partition("Check the documentation")[0]
        refused = " ".join(detail.split()).partition(". ")[0].removesuffix(".")
        return f"torch refuses to unpickle it with weights_only=True ({refused})"
    return " ".join(str(error).split())


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
    """Class decorator: make a tower available as ``type: name`` in configs, with its
    ``config_class`` as the options of ``type: name`` (:data:`~mmalign.registry.TOWER_OPTIONS`).

    Example:
        >>> @register_tower("constant_demo")  # doctest: +SKIP
        ... class ConstantTower(Tower): ...
    """

    def register(cls: type[Tower]) -> type[Tower]:
        TOWER_OPTIONS.register(name)(cls.config_class)
        return TOWERS.register(name)(cls)

    return register


def build_tower(
    config: Mapping[str, Any] | TowerConfig,
    field: str = "tower",
    base_dir: str | Path | None = None,
) -> Tower:
    """Build a tower from its config (a dict with ``type`` plus the tower's own keys, or a
    validated :class:`~mmalign.config.TowerConfig`), then freeze it as its ``trainable`` /
    ``lora`` say.

    ``field`` is the dotted config location used in error messages;
    ``base_dir`` resolves relative file paths (a saved model's directory).
    """
    try:
        parsed = tower_config(config if isinstance(config, TowerConfig) else dict(config))
    except ValidationError as error:
        raise config_error(error, field, "tower config") from None
    cls: type[Tower] = TOWERS.get(parsed.type, f"{field}.type")
    tower = cls(parsed, field=field, base_dir=Path(base_dir) if base_dir is not None else None)
    if parsed.trainable is not None:
        train_last_blocks(tower, tower.blocks(), parsed.trainable.last_blocks, field)
    if parsed.lora is not None:
        inject_lora(tower, parsed.lora, field)
    return tower
