"""What a run will do, said before it starts: the resolved plan, and whether the device can
run the configured precision.

:func:`mmalign.training.train` prints :func:`describe_plan` as soon as the config is checked
(before the model and the loader are built), and refuses a precision the device cannot run
(:func:`check_precision`) instead of running it emulated, many times slower.

Example:
    >>> from mmalign.config import load_config
    >>> config = load_config({"model": {"towers": {"labs": {"type": "tabular",
    ...     "in_features": 2}}}, "data": {"batch_size": 8}, "train": {"steps": 30}})
    >>> print(describe_plan(config, processes=1, device="cpu").splitlines()[1])
      steps: 30 (train.steps)
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.config import Config, ConfigError
from mmalign.data.sources import count_records, resolve_sources
from mmalign.data.splitting import describe_split
from mmalign.training.checks import total_steps


def _cpu_supports(precision: str) -> bool:
    if precision == "bf16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.cpu._is_amx_fp16_supported())


def device_supports(precision: str, device: torch.device | str) -> bool:
    """Whether ``device`` computes in ``precision`` natively (fp32: always).

    Example:
        >>> device_supports("fp32", "cpu")
        True
    """
    device = torch.device(device)
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_supports(precision)
    return True  # other accelerators: Accelerate decides


def check_precision(config: Config, device: torch.device | str) -> None:
    """Raise a :class:`ConfigError` naming ``train.precision`` when ``device`` cannot run it."""
    precision = config.train.precision
    if not device_supports(precision, device):
        raise ConfigError(
            f"train.precision: {precision} is not supported natively on this {device} "
            f"(it would be emulated, many times slower); set train.precision: fp32 "
            f"(--set train.precision=fp32) or train on a device with {precision} support"
        )


def _data_split(config: Config, processes: int) -> str:
    """How the training shards are split over nodes, processes and workers."""
    data = config.data
    if data.train is None:
        return "no data.train"
    shards = sum(len(source.urls) for source in resolve_sources(data.train, "data.train"))
    if data.resampled:
        return f"each process and worker draws from all {shards} shards (resampled)"
    return describe_split(shards, processes, data.workers)


def _source_lines(config: Config) -> list[str]:
    """One line per named source of ``data.train``: its shards, weight and records."""
    data = config.data
    sources = resolve_sources(data.train, "data.train") if data.train is not None else []
    total = sum(source.weight for source in sources)
    lines = []
    for source in sources:
        if not source.named:
            continue
        share = f"weight {source.weight:g} ({source.weight / total:.1%})"
        if data.resampled:
            part = f"{share} of the records drawn"
        else:
            records = count_records(source.urls)
            counted = "? (remote shards)" if records is None else str(records)
            part = f"{share} of the interleaving; {counted} records per epoch"
        lines.append(f"  source {source.name}: {len(source.urls)} shards, {part}")
    return lines


def describe_plan(config: Config, processes: int, device: torch.device | str) -> str:
    """The resolved plan of a run, several lines: steps, batches, epochs, precision, logs."""
    data, train = config.data, config.train
    steps = total_steps(config)
    global_batch = data.batch_size * train.accumulate * processes
    if train.epochs is not None:
        length = f"{steps} ({train.epochs} epochs of data.epoch_samples; train.epochs)"
    else:
        length = f"{steps} (train.steps)"
    if data.epoch_samples is not None:
        epoch = f"{data.epoch_samples * processes} samples ({data.epoch_samples} per process)"
    else:
        epoch = "one pass over the training shards" + (
            " (resampled: an endless stream)" if data.resampled else ""
        )
    output = Path(train.output)
    validation = (
        "none (no data.val)"
        if data.val is None
        else f"every {config.eval.every} steps and at the end"
        if config.eval.every
        else "at the end"
    )
    lines = [
        "plan:",
        f"  steps: {length}",
        f"  global batch: {global_batch} samples per step ({data.batch_size} per micro-batch "
        f"x {train.accumulate} accumulated x {processes} processes); "
        f"{steps * global_batch} samples in all",
        f"  epoch: {epoch}",
        f"  data split: {_data_split(config, processes)}",
        *_source_lines(config),
        f"  precision: {train.precision} on {device}",
        f"  validation: {validation}",
        f"  logs: every {train.log_every} steps to {output / 'train.log'} and "
        f"{output / 'metrics.jsonl'}"
        + (f", TensorBoard in {output}" if train.tensorboard else "")
        + f"; model: {output / 'model'}",
    ]
    return "\n".join(lines)
