"""The ``ddp`` strategy (the default): Accelerate prepares the model
(``DistributedDataParallel`` with more than one process, nothing in one) and the optimizer;
checkpoints hold whole tensors (:func:`mmalign.training.checkpoint.write_weights`).

Example:
    >>> DataParallel.name
    'ddp'
    >>> try:
    ...     DataParallel.check_launch({"ACCELERATE_USE_FSDP": "true"})
    ... except UserError as error:
    ...     print(str(error)[:58])
    the launch config asks for FSDP (ACCELERATE_USE_FSDP=true)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.errors import UserError
from mmalign.training import checkpoint
from mmalign.training.parallel.base import Strategy, environ_flag


class DataParallel(Strategy):
    """The ``ddp`` strategy: everything through Accelerate, checkpoints of whole tensors."""

    name = "ddp"

    @classmethod
    def check_launch(cls, environ: Mapping[str, str] = os.environ) -> None:
        """Also refuse a launch config that asks for Accelerate's FSDP (mmalign shards the
        model itself under ``train.strategy: fsdp``)."""
        super().check_launch(environ)
        if environ_flag(environ, "ACCELERATE_USE_FSDP"):
            raise UserError(
                "the launch config asks for FSDP (ACCELERATE_USE_FSDP=true) but train.strategy "
                f"is {cls.name}; add --set train.strategy=fsdp, or launch without the FSDP "
                "config"
            )

    def prepare(
        self, step_module: nn.Module, build_optimizer: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``accelerator.prepare`` of the step module and its optimizer."""
        optimizer = build_optimizer(step_module.get_submodule("model"))
        return self.accelerator.prepare(step_module, optimizer)

    def no_sync(self, step_module: nn.Module) -> AbstractContextManager:
        """DDP's ``no_sync`` (through Accelerate)."""
        return self.accelerator.no_sync(step_module)

    def clip_gradients(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Accelerate's ``clip_grad_norm_`` (unscales fp16 first); 0 where it hides it."""
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else 0.0

    def write_weights(
        self, directory: Path, accelerator: Any, model: nn.Module, optimizer: Any
    ) -> None:
        """:func:`mmalign.training.checkpoint.write_weights` (the main process writes)."""
        checkpoint.write_weights(directory, accelerator, model, optimizer)

    def read_weights(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        """:func:`mmalign.training.checkpoint.read_weights`."""
        checkpoint.read_weights(directory, model, optimizer)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """``None``: the main process saves ``model`` as it is."""
        return None
