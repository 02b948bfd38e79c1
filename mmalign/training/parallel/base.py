"""What every strategy shares (:class:`Strategy`: checkpoints through its own weight files,
the launch it refuses, the config it refuses), the check that the launched processes formed
one group (:func:`check_group`), and what ran (:func:`describe_run`: strategy, world size,
nodes, processes per node from the launcher's ``LOCAL_WORLD_SIZE`` / ``GROUP_WORLD_SIZE``,
precision; the start line and ``run.json`` say it).

DeepSpeed runs when the launch config asks for it (``accelerate launch --config_file
configs/accelerate/deepspeed_zero2.yaml``: Accelerate then prepares the model with the
DeepSpeed engine); every strategy refuses it when ``deepspeed`` is not installed.

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
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmalign.config import Config
from mmalign.errors import UserError
from mmalign.training import checkpoint

_TRUE = ("1", "true", "yes")


def environ_flag(environ: Mapping[str, str], name: str) -> bool:
    """Whether the launcher set ``name`` to a true value (``1``, ``true``, ``yes``).

    Example:
        >>> environ_flag({"ACCELERATE_USE_FSDP": "True"}, "ACCELERATE_USE_FSDP")
        True
    """
    return environ.get(name, "").lower() in _TRUE


def launcher_asks_deepspeed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return environ_flag(environ, "ACCELERATE_USE_DEEPSPEED")


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


class Strategy(ABC):
    """How the model, optimizer, gradients and checkpoint weights are spread over processes
    (``train.strategy``); each strategy holds its limits (:meth:`check_launch`,
    :meth:`config_problems`). Checkpoint directories follow
    :mod:`mmalign.training.checkpoint`, with the strategy's :meth:`write_weights` /
    :meth:`read_weights` for the model and optimizer files."""

    name: ClassVar[str]
    """The ``train.strategy`` value."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    @classmethod
    def check_launch(cls, environ: Mapping[str, str] = os.environ) -> None:
        """Refuse a launch config this strategy cannot run (before Accelerate starts):
        DeepSpeed asked for without the ``deepspeed`` package."""
        if launcher_asks_deepspeed(environ) and importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "the launch config asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but the "
                "deepspeed package is not installed; pip install deepspeed on a GPU machine, or "
                "launch with configs/accelerate/fsdp.yaml and --set train.strategy=fsdp"
            )

    @classmethod
    def config_problems(cls, config: Config) -> list[str]:
        """The run config's settings this strategy cannot honour, one line each (none)."""
        return []

    @abstractmethod
    def prepare(
        self, step_module: nn.Module, build_optimizer: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The step module and an optimizer over its model, ready to train."""

    @abstractmethod
    def no_sync(self, step_module: nn.Module) -> AbstractContextManager:
        """A context in which backward passes do not synchronize gradients."""

    @abstractmethod
    def clip_gradients(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""

    @abstractmethod
    def write_weights(
        self, directory: Path, accelerator: Any, model: nn.Module, optimizer: Any
    ) -> None:
        """Write the model and optimizer files of a checkpoint into ``directory``."""

    @abstractmethod
    def read_weights(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        """Read what :meth:`write_weights` wrote."""

    @abstractmethod
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict for the main process to save, or ``None`` when
        ``model`` can be saved as it is."""

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
