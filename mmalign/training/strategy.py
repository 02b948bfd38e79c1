"""How a run is spread over processes (``train.strategy``) and what actually ran.

- ``ddp`` (the default): Accelerate prepares the model (``DistributedDataParallel`` with more
  than one process, nothing in one) and the optimizer; checkpoints hold whole tensors.
- ``fsdp``: with more than one process, mmalign shards the model itself with FSDP2
  (:mod:`mmalign.training.fsdp`) and saves checkpoints sharded
  (:mod:`mmalign.training.sharded_checkpoint`); in one process it is the same as ``ddp``.

DeepSpeed runs when the launch config asks for it (``accelerate launch --config_file
configs/accelerate/deepspeed_zero2.yaml``: Accelerate then prepares the model with the
DeepSpeed engine); :func:`check_launch` refuses it when ``deepspeed`` is not installed, and a
launch config that asks for FSDP while ``train.strategy`` is ``ddp``.

:func:`describe_run` is what the start line and ``run.json`` say: strategy, world size,
nodes, processes per node (from the launcher's ``LOCAL_WORLD_SIZE`` / ``GROUP_WORLD_SIZE``)
and precision. :func:`check_group` stops a run whose launcher started several processes that
did not form one group: each would train alone on the same run directory.

Example:
    >>> describe_run("ddp", "bf16", world_size=1, environ={})["strategy"]
    'single process'
    >>> info = describe_run("fsdp", "fp32", world_size=4,
    ...                     environ={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    >>> info["strategy"], info["nodes"], info["processes_per_node"]
    ('FSDP', 2, 2)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.config import Config
from mmalign.errors import UserError
from mmalign.training import checkpoint

_TRUE = ("1", "true", "yes")


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").lower() in _TRUE


def launcher_asks_deepspeed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return _flag(environ, "ACCELERATE_USE_DEEPSPEED")


def check_launch(config: Config, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch that cannot do what it asks (before Accelerate starts).

    Example:
        >>> from mmalign.config import Config
        >>> config = Config(model={"towers": {"a": {"type": "tabular", "in_features": 2}}})
        >>> try:
        ...     check_launch(config, {"ACCELERATE_USE_FSDP": "true"})
        ... except UserError as error:
        ...     print(str(error)[:58])
        the launch config asks for FSDP (ACCELERATE_USE_FSDP=true)
    """
    if launcher_asks_deepspeed(environ) and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "the launch config asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but the "
            "deepspeed package is not installed; pip install deepspeed on a GPU machine, or "
            "launch with configs/accelerate/fsdp.yaml and --set train.strategy=fsdp"
        )
    if launcher_asks_deepspeed(environ) and config.train.strategy == "fsdp":
        raise UserError(
            "the launch config asks for DeepSpeed but train.strategy is fsdp; use one: "
            "--set train.strategy=ddp with a DeepSpeed config, or configs/accelerate/fsdp.yaml"
        )
    if _flag(environ, "ACCELERATE_USE_FSDP") and config.train.strategy != "fsdp":
        raise UserError(
            "the launch config asks for FSDP (ACCELERATE_USE_FSDP=true) but train.strategy "
            f"is {config.train.strategy}; add --set train.strategy=fsdp, or launch without "
            "the FSDP config"
        )


def check_group(world_size: int, environ: Mapping[str, str] = os.environ) -> None:
    """A :class:`~mmalign.errors.UserError` when the launcher said ``WORLD_SIZE`` > 1 but
    this process is alone in its group (each process would train on its own).

    Example:
        >>> try:
        ...     check_group(1, {"WORLD_SIZE": "2"})
        ... except UserError as error:
        ...     print(str(error)[:56])
        the launcher started WORLD_SIZE=2 processes but they did
    """
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size == 1:
        raise UserError(
            f"the launcher started WORLD_SIZE={launched} processes but they did not form "
            f"one process group (this one sees world size {world_size}): each would train "
            f"alone on the same run directory; launch with torchrun --nproc_per_node "
            f"{launched} or accelerate launch --multi_gpu --num_processes {launched} "
            "(see docs/fsdp.md)"
        )


def _deepspeed_stage(environ: Mapping[str, str]) -> str:
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed"


def describe_run(
    strategy: str, precision: str, world_size: int, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """What ran: ``strategy`` (``single process``, ``DDP``, ``FSDP``, ``DeepSpeed ZeRO-N``),
    ``world_size``, ``nodes``, ``processes_per_node``, ``precision``."""
    per_node = int(environ.get("LOCAL_WORLD_SIZE") or world_size)
    nodes = int(environ.get("GROUP_WORLD_SIZE") or max(world_size // max(per_node, 1), 1))
    if world_size == 1:
        name = "single process"
    elif launcher_asks_deepspeed(environ):
        name = _deepspeed_stage(environ)
    else:
        name = "FSDP" if strategy == "fsdp" else "DDP"
    return {
        "strategy": name,
        "world_size": world_size,
        "nodes": nodes,
        "processes_per_node": per_node,
        "precision": precision,
    }


def run_summary(info: Mapping[str, Any]) -> str:
    """One line of :func:`describe_run`'s result, for the start message.

    Example:
        >>> run_summary(describe_run("fsdp", "fp32", 2, {"LOCAL_WORLD_SIZE": "2"}))
        'FSDP, world size 2 (1 node x 2 processes), precision fp32'
    """
    nodes = "node" if info["nodes"] == 1 else "nodes"
    return (
        f"{info['strategy']}, world size {info['world_size']} ({info['nodes']} {nodes} x "
        f"{info['processes_per_node']} processes), precision {info['precision']}"
    )


class DataParallel:
    """The ``ddp`` strategy: everything through Accelerate, checkpoints of whole tensors.
    :class:`mmalign.training.fsdp.FullySharded` overrides what differs under ``fsdp``."""

    name = "ddp"
    sharded = False

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def prepare(
        self, step_module: nn.Module, build_optimizer: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``accelerator.prepare`` of the step module and its optimizer."""
        optimizer = build_optimizer(step_module.model)
        return self.accelerator.prepare(step_module, optimizer)

    def no_sync(self, step_module: nn.Module) -> AbstractContextManager:
        """DDP's ``no_sync`` (through Accelerate)."""
        return self.accelerator.no_sync(step_module)

    def clip_gradients(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Accelerate's ``clip_grad_norm_`` (unscales fp16 first); 0 where it hides it."""
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else 0.0

    write_weights = staticmethod(checkpoint.write_weights)
    read_weights = staticmethod(checkpoint.read_weights)

    def save_checkpoint(
        self,
        directory: Path,
        step: int,
        model: nn.Module,
        optimizer: Any,
        state: dict,
        ema: nn.Module | None = None,
    ) -> Path:
        """:func:`mmalign.training.checkpoint.save_checkpoint` with this strategy's
        weights (and the weight average ``ema``, when set); a collective call."""
        return checkpoint.save_checkpoint(
            directory, step, self.accelerator, model, optimizer, state, self.write_weights, ema
        )

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: Any, ema: nn.Module | None = None
    ) -> dict[str, Any]:
        """:func:`mmalign.training.checkpoint.load_checkpoint` with this strategy's weights."""
        rank = self.accelerator.process_index
        return checkpoint.load_checkpoint(path, rank, model, optimizer, self.read_weights, ema)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """``None``: the main process saves ``model`` as it is."""
        return None


def build_strategy(config: Config, accelerator: Any) -> Any:
    """The strategy object of ``train.strategy`` (``fsdp`` with one process is ``ddp``)."""
    check_group(accelerator.num_processes)
    if config.train.strategy == "fsdp" and accelerator.num_processes > 1:
        from mmalign.training.fsdp import FullySharded

        return FullySharded(accelerator)
    return DataParallel(accelerator)
