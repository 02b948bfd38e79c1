"""Whether a model's state is fit to train on, save or call good: every parameter (the
temperature included) finite and within ``train.max_abs_weight``, every normalization
statistic that training updates (BatchNorm's running mean and variance) finite. Other buffers
are constants and may hold infinities by design (an attention mask's ``-inf``).

The trainer checks after every optimizer step; a state that fails is never saved. The check
costs one reduction per tensor and one device synchronization.

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> unhealthy_tensor(model, max_abs=1e4) is None
    True
    >>> with torch.no_grad():
    ...     model.bias[0] = float("nan")
    >>> unhealthy_tensor(model, max_abs=1e4)
    ('bias', nan)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmalign.config import TrainConfig

RUNNING_STATISTICS = ("running_mean", "running_var")
"""Buffers that training updates (normalization layers); the only buffers checked."""


def _largest(tensors: list[torch.Tensor]) -> float:
    """The largest magnitude over ``tensors`` (NaN when any holds a NaN); of a sharded
    tensor, over this process's shard (the trainer combines the verdicts of all ranks)."""
    if not tensors:
        return 0.0
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]  # FSDP: own shard
    local = [t for t in local if t.numel()]
    if not local:
        return 0.0
    device = local[0].device
    return float(torch.stack([t.detach().abs().amax().float().to(device) for t in local]).max())


def unhealthy_tensor(model: nn.Module, max_abs: float) -> tuple[str, float] | None:
    """The first parameter that is non-finite or larger than ``max_abs`` in magnitude, or
    the first non-finite running statistic, with its largest magnitude; ``None`` when all
    are fine.
    """
    parameters = dict(model.named_parameters())
    buffers = {
        name: buffer
        for name, buffer in model.named_buffers()
        if name.rpartition(".")[2] in RUNNING_STATISTICS and buffer.numel()
    }
    largest = _largest(list(parameters.values()))
    if (
        math.isfinite(largest)
        and largest <= max_abs
        and math.isfinite(_largest(list(buffers.values())))
    ):
        return None
    for name, tensor in parameters.items():
        value = _largest([tensor])
        if not math.isfinite(value) or value > max_abs:
            return name, value
    for name, buffer in buffers.items():
        value = _largest([buffer])
        if not math.isfinite(value):
            return name, value
    return None


def suggested_lr(lr: float) -> float:
    """The learning rate a stopped run suggests: ten times lower, at most 1e-3.

    Example:
        >>> suggested_lr(1e308), f"{suggested_lr(3e-3):g}"
        (0.001, '0.0003')
    """
    return min(lr / 10, 1e-3)


def divergence_message(
    step: int, name: str, value: float, train: TrainConfig, last: Path | None
) -> str:
    """What a run that diverged at ``step`` (``name`` reached ``value``) says: nothing of it
    is saved, the last good checkpoint, and a ``--resume`` command that works."""
    what = "the temperature (logit_scale)" if name == "logit_scale" else f"'{name}'"
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
    return (
        f"training diverged at step {step}: {what} reached {value:.3g} "
        f"(train.max_abs_weight={train.max_abs_weight:g}); this state is not saved and "
        f"{kept}. Lower train.lr (it is {train.lr:g}) and continue: --resume --set "
        f"train.lr={suggested_lr(train.lr):g} (or raise train.warmup, or use precision "
        "fp32/bf16)"
    )
