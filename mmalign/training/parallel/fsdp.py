"""Fully sharded data parallel training (``train.strategy: fsdp``) with torch's FSDP2.

:func:`shard_model` applies :func:`torch.distributed.fsdp.fully_shard` itself, on every
device (CPU with gloo included, where ``accelerate launch`` with an FSDP config does not shard
anything): first each tower's blocks (``Tower.blocks()``: open_clip's ``resblocks``, timm's
``blocks``, a Hugging Face ``encoder.layer``, a GNN layer's convolution with its norm), then
each tower, then the whole :class:`~mmalign.AlignmentModel`. Every parameter becomes a
``DTensor`` sharded on its first dimension, each process holding 1/N of it; the forward
all-gathers a unit's parameters, the backward reduce-scatters (averages) their gradients, as
DDP's all-reduce averages them.

FSDP2 cannot shard a 0-dimensional parameter (the temperature ``logit_scale``, the sigmoid
``logit_bias``): those stay whole on every process and :meth:`FullySharded.clip_gradients`
averages their gradients across processes before the gradient norm is taken. Embeddings
are gathered across processes by the objectives exactly as under DDP
(:mod:`mmalign.objectives.distributed`).

Example:
    >>> strategy = FullySharded(accelerator)  # doctest: +SKIP
    >>> step_module, optimizer = strategy.prepare(ContrastiveStep(model), build)  # doctest: +SKIP
    >>> type(model.towers["image"].trunk.blocks[0].attn.qkv.weight).__name__  # doctest: +SKIP
    'DTensor'
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from mmalign.config import Config
from mmalign.errors import UserError
from mmalign.training.parallel import sharded_checkpoint
from mmalign.training.parallel.base import Strategy, launcher_asks_deepspeed

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel


def whole_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 0-dimensional parameters, which FSDP2 cannot shard (kept whole on every rank).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> model.scale = nn.Parameter(torch.tensor(1.0))
        >>> [tuple(parameter.shape) for parameter in whole_parameters(model)]
        [()]
    """
    return [parameter for parameter in model.parameters() if parameter.ndim == 0]


def shard_model(model: AlignmentModel) -> list[nn.Parameter]:
    """``fully_shard`` each tower's blocks, each tower, then ``model`` (which must hold
    ``towers``); returns the parameters left whole (see :func:`whole_parameters`)."""
    # FSDP2 warns, at every forward, that a sharded module returned a view (open_clip's
    # image towers do) since an in-place op on that view would skip the backward all-gather.
    # The model feeds every tower's output straight into its projection, out of place, so no
    # such op exists; gradients equal the unsharded model's (tests/training/test_fsdp.py).
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(\w+\) returned a view tensor",
        category=UserWarning,
        module=r"torch\.distributed\.fsdp",
    )
    whole = whole_parameters(model)
    ignored = set(whole)
    for tower in model.towers.values():
        for block in tower.blocks():
            fully_shard(block[0] if len(block) == 1 else block, ignored_params=ignored)
        if any(parameter not in ignored for parameter in tower.parameters()):
            fully_shard(tower, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return whole


def local_part(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor`` (its shard for a ``DTensor``, else itself)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _fsdp_modules(module: nn.Module) -> list[FSDPModule]:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class FullySharded(Strategy):
    """The ``fsdp`` strategy: sharding, gradient sync, clipping, sharded checkpoints and the
    consolidated final weights (see the module docstring)."""

    name = "fsdp"

    @classmethod
    def check_launch(cls, environ: Mapping[str, str] = os.environ) -> None:
        """Also refuse a launch config that asks for DeepSpeed (one sharding at a time)."""
        super().check_launch(environ)
        if launcher_asks_deepspeed(environ):
            raise UserError(
                "the launch config asks for DeepSpeed but train.strategy is fsdp; use one: "
                "--set train.strategy=ddp with a DeepSpeed config, or configs/accelerate/fsdp.yaml"
            )

    @classmethod
    def config_problems(cls, config: Config) -> list[str]:
        """No gradient scaler for sharded gradients (fp16) and no weight average
        (``train.ema`` would need a sharded copy of the model)."""
        problems = []
        if config.train.precision == "fp16":
            problems.append(
                "train.precision: fp16 is not supported with train.strategy fsdp (no gradient "
                "scaler for sharded gradients); use bf16 or fp32"
            )
        if config.train.ema is not None:
            problems.append(
                "train.ema: a weight average is not kept under train.strategy fsdp (it would "
                "need a sharded copy of the model); unset train.ema or use train.strategy ddp"
            )
        return problems

    def __init__(self, accelerator: Any) -> None:
        super().__init__(accelerator)
        self.whole: list[nn.Parameter] = []
        self.model: nn.Module | None = None

    def prepare(
        self, step_module: nn.Module, build_optimizer: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard ``step_module.model`` in place; the step module and an optimizer built over
        the sharded parameters (Accelerate wraps neither)."""
        model = cast("AlignmentModel", step_module.get_submodule("model"))
        self.model = model
        self.whole = shard_model(model)
        return step_module, build_optimizer(model)

    @contextmanager
    def no_sync(self, step_module: nn.Module) -> Iterator[None]:
        """Backward passes inside keep their gradients unsharded and unreduced (the last,
        synchronizing pass of an accumulated step reduce-scatters the sum)."""
        modules = _fsdp_modules(step_module)
        for module in modules:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True, recurse=False)

    def clip_gradients(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Average the whole parameters' gradients across processes, then clip the global
        gradient norm (over every shard) to ``max_norm``; returns the norm before clipping."""
        world = dist.get_world_size()
        for parameter in self.whole:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(world)
        grads = [p.grad for p in parameters if p.grad is not None]
        sharded = [local_part(g).double().pow(2).sum() for g in grads if isinstance(g, DTensor)]
        whole = [g.double().pow(2).sum() for g in grads if not isinstance(g, DTensor)]
        squares = torch.stack(sharded).sum() if sharded else torch.zeros((), dtype=torch.double)
        dist.all_reduce(squares)
        total = math.sqrt(float(squares + (torch.stack(whole).sum() if whole else 0.0)))
        coefficient = min(max_norm / (total + 1e-6), 1.0)
        if coefficient < 1.0:
            for grad in grads:
                local_part(grad).mul_(coefficient)
        return total

    def reshard(self) -> None:
        """Bring every unit back to its sharded state (the root stays gathered after a
        forward without backward); nothing before :meth:`prepare`."""
        for module in _fsdp_modules(self.model) if self.model is not None else []:
            module.reshard()

    def write_weights(
        self, directory: Path, accelerator: Any, model: nn.Module, optimizer: Any
    ) -> None:
        """Save model and optimizer sharded into ``directory``; a collective call."""
        self.reshard()
        sharded_checkpoint.save(directory, model, optimizer, accelerator.num_processes)

    def read_weights(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        """Load what :meth:`write_weights` saved (same world size); a collective call."""
        self.reshard()
        sharded_checkpoint.load(directory, model, optimizer, dist.get_world_size())

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The whole model's state dict on the main process (``None`` elsewhere), gathered
        from every shard; a collective call."""
        self.reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return cast(dict[str, Tensor], state) if self.accelerator.is_main_process else None
