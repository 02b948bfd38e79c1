"""Which settings a resumed run may change, and applying the optimizer ones.

A run continued with ``--resume`` (from a checkpoint) keeps everything that decides what the
checkpoint means: the model, the data stream (shards, fields, batch size, workers, seeds,
shuffling), accumulation, precision and seed. It may change what only acts from now on
(:data:`CHANGEABLE`): where the run directory is, the length of the run, the optimizer's
hyperparameters and schedule, clipping, the divergence guards, logging, checkpointing and
validation. Those take effect
at the resumed step (the learning rate from the new ``train.lr`` and the schedule at that
step); any other difference from the run's ``config.yaml`` is refused, naming the field.

Example:
    >>> changed_fields({"train": {"lr": 1.0, "seed": 0}}, {"train": {"lr": 0.1, "seed": 1}})
    ['train.lr', 'train.seed']
    >>> refused_fields(["train.lr", "train.seed"])
    ['train.seed']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from mmalign.config import Config, ConfigError, TrainConfig
from mmalign.config.strict_yaml import read_yaml

CHANGEABLE = (
    "train.steps",
    "train.epochs",
    "train.lr",
    "train.weight_decay",
    "train.betas",
    "train.eps",
    "train.warmup",
    "train.schedule",
    "train.grad_clip",
    "train.max_nonfinite",
    "train.max_abs_weight",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.tensorboard",
    "train.plots",
    "train.profile",
    "train.find_unused_parameters",
    "train.log_sample_keys",
    "train.gradient_checkpointing",
    "train.host_memory",
    "train.spill_inputs",
    "train.compile",
    "train.output",
    "data.val",
    "data.test",
    "data.classes",
    "data.max_member_bytes",
    "data.max_decoded_bytes",
    "data.audio_sample_rates",
    "data.max_audio_seconds",
    "data.max_video_seconds",
    "data.max_video_frames",
    "data.max_video_pixels",
    "data.max_signal_samples",
    "data.max_signal_channels",
    "eval.",
)
"""Fields (``eval.`` is every field of ``eval``) a resumed run may change."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat or {prefix: data}


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted fields whose value differs between two config dicts, sorted."""
    old, new = _flatten(saved), _flatten(current)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def refused_fields(fields: list[str]) -> list[str]:
    """The ``fields`` a resumed run may not change."""
    return [
        field
        for field in fields
        if not any(field == allowed or field.startswith(allowed) for allowed in CHANGEABLE)
    ]


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict; an unreadable one is a :class:`ConfigError` naming
    the file."""
    data = read_yaml(path, "the run's config")
    if not isinstance(data, dict):
        raise ConfigError(f"the run's config is no mapping ({path}); restore it")
    return data


def check_resume_changes(saved_config: Path, config: Config) -> None:
    """Refuse ``config`` for resuming the run whose ``config.yaml`` is ``saved_config`` when
    it changes a field outside :data:`CHANGEABLE`."""
    saved = read_run_config(saved_config)
    refused = refused_fields(changed_fields(saved, config.to_dict()))
    if refused:
        old, new = _flatten(saved), _flatten(config.to_dict())
        details = "; ".join(f"{f}: {old.get(f)!r} there, {new.get(f)!r} now" for f in refused)
        raise ConfigError(
            f"{refused[0]}: a resumed run cannot change it ({details}; from {saved_config}). "
            "On --resume only the run length, optimizer, schedule, clipping, logging, "
            "checkpointing and validation settings may change; set train.output to a new "
            "directory for a new run"
        )


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, config: TrainConfig
) -> None:
    """After loading a checkpoint: the configured learning rate, weight decay, betas and eps
    replace the checkpoint's, and the learning rate is the schedule's at the resumed step.

    The parameter groups are those of :func:`mmalign.training.optim.build_optimizer`: each
    keeps its ``lr_scale`` (layer-wise decay) and whether it ``decays`` (a checkpoint
    without these keys has decayed weights, then undecayed parameters, at the full rate).
    """
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    scheduler.base_lrs = [config.lr * scale for scale in scales]
    groups = zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs)
    for index, (group, factor, base_lr) in enumerate(groups):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
        group["weight_decay"] = config.weight_decay if group.get("decays", index == 0) else 0.0
        group["betas"] = tuple(config.betas)
        group["eps"] = config.eps
