"""Pretrained open_clip models for the image and text towers (``pretrained:``), read locally.

A tower's ``pretrained:`` names a whole open_clip model, whose architecture, preprocessing and
weights the tower takes:

- ``local-dir:DIR``: a folder with ``open_clip_config.json`` (``{"model_cfg": ...,
  "preprocess_cfg": ...}``, the layout ``open_clip.create_model("local-dir:DIR")`` and
  ``mmalign convert --to open_clip`` use) and a checkpoint (``open_clip_model.safetensors``,
  ``open_clip_pytorch_model.bin``, ...);
- ``hf-hub:ORG/NAME``: the same folder, taken from the local Hugging Face cache
  (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``: the snapshot ``refs/main`` points
  at). Nothing is downloaded; a name missing from the cache is an error naming the cache.

An open_clip model name plus a checkpoint file needs no ``pretrained:``: ``model: ViT-B-32``
and ``checkpoint: FILE``. Either way, a ``logit_scale`` in the checkpoint is reported
(:func:`checkpoint_logit_scale`) so the model can carry the temperature over
(``model.logit_scale_init``).

Example:
    >>> source = resolve_pretrained("local-dir:/models/clip", "image")  # doctest: +SKIP
    >>> source.model_cfg["embed_dim"], source.checkpoint.name  # doctest: +SKIP
    (512, 'open_clip_model.safetensors')
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.errors import ConfigError
from mmalign.towers.base import Tower

OPEN_CLIP_CONFIG = "open_clip_config.json"
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
"""Checkpoint file names of an open_clip folder, in open_clip's order of preference."""


@dataclass(frozen=True)
class PretrainedSource:
    """A resolved open_clip folder: its model and preprocessing configs and its checkpoint."""

    directory: Path
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


def resolve_pretrained(
    spec: str, field_name: str, base_dir: Path | None = None
) -> PretrainedSource:
    """Resolve ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` (from the local cache) to a
    :class:`PretrainedSource`; ``field_name`` is the config field, for errors."""
    where = f"{field_name}.pretrained"
    schema, _, identifier = spec.partition(":")
    if schema == "local-dir" and identifier:
        directory = Path(identifier).expanduser()
        if not directory.is_absolute() and base_dir is not None:
            directory = base_dir / directory
    elif schema == "hf-hub" and identifier:
        directory = _cached_snapshot(identifier, where)
    else:
        raise ConfigError(
            f"{where}: {spec!r} is neither local-dir:DIR nor hf-hub:ORG/NAME; for an open_clip "
            "model name with a checkpoint file use `model:` and `checkpoint:`"
        )
    config_file = directory / OPEN_CLIP_CONFIG
    if not config_file.is_file():
        raise ConfigError(
            f"{where}: {config_file} does not exist; the folder must hold {OPEN_CLIP_CONFIG} "
            "and a checkpoint (as written by open_clip's push_to_hf_hub or mmalign convert)"
        )
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ConfigError(f"{where}: {config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ConfigError(f"{where}: {config_file} has no 'model_cfg' mapping")
    checkpoint = next(
        (directory / name for name in CHECKPOINT_NAMES if (directory / name).is_file()), None
    )
    return PretrainedSource(
        directory=directory,
        model_cfg=config["model_cfg"],
        preprocess_cfg=dict(config.get("preprocess_cfg") or {}),
        checkpoint=checkpoint,
    )


def _cached_snapshot(repo_id: str, where: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (never downloads)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as error:
        raise ConfigError(
            f"{where}: hf-hub:{repo_id} is not in the local Hugging Face cache "
            f"{constants.HF_HUB_CACHE} ({type(error).__name__}); mmalign never downloads: run "
            f"`hf download {repo_id}` on a machine with access and copy the cache, or point "
            "HF_HUB_CACHE (or HF_HOME) at it"
        ) from None


def checkpoint_logit_scale(state: dict[str, torch.Tensor], source: str) -> tuple[str, float] | None:
    """``(source, logit_scale)`` of a CLIP checkpoint's state dict (log scale, as open_clip and
    mmalign store it), or ``None`` when it has none.

    Example:
        >>> checkpoint_logit_scale({"logit_scale": torch.tensor(3.0)}, "ckpt")
        ('ckpt', 3.0)
    """
    value = state.get("logit_scale")
    if value is None or value.numel() != 1:
        return None
    return source, float(value.reshape(()))


def compact_config(cfg: Any) -> dict[str, Any]:
    """The fields of an open_clip config dataclass that differ from its defaults (the form
    of open_clip's own model configs).

    Example:
        >>> from open_clip.model import CLIPTextCfg
        >>> compact_config(CLIPTextCfg(width=64, layers=2))
        {'width': 64, 'layers': 2}
    """
    default = type(cfg)()
    return {
        item.name: getattr(cfg, item.name)
        for item in dataclasses.fields(cfg)
        if getattr(cfg, item.name) != getattr(default, item.name)
    }


def initial_logit_scale(setting: float | str | None, towers: Mapping[str, Tower]) -> float:
    """The model's initial log temperature for ``model.logit_scale_init`` (``setting``): a
    number as given; ``from_checkpoint``: the towers' CLIP checkpoint's ``logit_scale``;
    ``None``: that one when two or more towers load one checkpoint holding it, else
    ``log(1/0.07)``.

    Example:
        >>> round(initial_logit_scale(None, {}), 4)
        2.6593
    """
    if isinstance(setting, int | float):
        return float(setting)
    found = {
        name: tower.pretrained_logit_scale
        for name, tower in towers.items()
        if tower.pretrained_logit_scale is not None
    }
    values = sorted({value for _, value in found.values()})
    if setting is None:
        one_checkpoint = len(found) >= 2 and len({file for file, _ in found.values()}) == 1
        return values[0] if one_checkpoint else math.log(1 / 0.07)
    if not found:
        raise ConfigError(
            "model.logit_scale_init: from_checkpoint, but no tower loaded a CLIP checkpoint "
            "holding logit_scale; give a number (e.g. 2.6593 = log(1/0.07)) or load one"
        )
    if len(values) > 1:
        raise ConfigError(
            f"model.logit_scale_init: the towers' checkpoints disagree on logit_scale "
            f"({', '.join(f'{name}: {value:g}' for name, (_, value) in found.items())}); "
            "give the number to start from"
        )
    return values[0]


def named_or_pretrained_config(
    model: str | None, pretrained: str | None, field_name: str, base_dir: Path | None
) -> tuple[dict[str, Any], PretrainedSource | None]:
    """The open_clip ``model_cfg`` a tower starts from: a built-in or registered model name's,
    a ``pretrained:`` folder's, or empty; plus the resolved source."""
    if model and pretrained:
        raise ConfigError(
            f"{field_name}: `model:` and `pretrained:` both name an architecture; keep "
            "`pretrained:` (its open_clip_config.json holds it) or `model:` with `checkpoint:`"
        )
    if pretrained:
        source = resolve_pretrained(pretrained, field_name, base_dir)
        return dict(source.model_cfg), source
    return (named_model_config(model, field_name) if model else {}), None


def named_model_config(name: str, field_name: str) -> dict[str, Any]:
    """The built-in (or registered) open_clip config of ``name``; nothing downloads."""
    import open_clip

    config = None if ":" in name else open_clip.get_model_config(name)
    if config is None:
        raise ConfigError(
            f"{field_name}.model: {name!r} is not a built-in open_clip model config; "
            "pick one of open_clip.list_models() (e.g. ViT-B-32), or a local open_clip folder "
            "with `pretrained: local-dir:DIR` (or `hf-hub:ORG/NAME` from the local cache)"
        )
    return config
