"""How a run is spread over processes (``train.strategy``), one module per strategy, each
strategy class holding its limits (as Lightning's ``fabric/strategies/``):

- :mod:`~mmalign.training.parallel.base`: what every strategy shares (:class:`Strategy`),
  the process-group check and what ran (:func:`~mmalign.training.parallel.base.describe_run`);
- :mod:`~mmalign.training.parallel.ddp`: ``ddp`` (the default), everything through Accelerate;
- :mod:`~mmalign.training.parallel.fsdp`: ``fsdp``, FSDP2 applied by mmalign itself, with
  checkpoints saved sharded (:mod:`~mmalign.training.parallel.sharded_checkpoint`).

With one process ``fsdp`` is the same as ``ddp``. Adding a strategy is its module plus one
line of :data:`STRATEGIES`.

Example:
    >>> sorted(STRATEGIES)
    ['ddp', 'fsdp']
    >>> from mmalign.config import Config
    >>> config = Config(model={"towers": {"a": {"type": "tabular", "in_features": 2}}},
    ...                 train={"strategy": "fsdp", "precision": "fp16"})
    >>> strategy_problems(config)[0][:47]
    'train.precision: fp16 is not supported with tra'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mmalign.config import Config
from mmalign.training.parallel.base import Strategy, check_group
from mmalign.training.parallel.ddp import DataParallel
from mmalign.training.parallel.fsdp import FullySharded

STRATEGIES: dict[str, type[Strategy]] = {
    DataParallel.name: DataParallel,
    FullySharded.name: FullySharded,
}
"""Each ``train.strategy`` value and its class."""


def check_launch(config: Config, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch the configured strategy cannot run (before Accelerate starts).

    Example:
        >>> from mmalign.errors import UserError
        >>> config = Config(model={"towers": {"a": {"type": "tabular", "in_features": 2}}})
        >>> try:
        ...     check_launch(config, {"ACCELERATE_USE_FSDP": "true"})
        ... except UserError as error:
        ...     print(str(error)[:58])
        the launch config asks for FSDP (ACCELERATE_USE_FSDP=true)
    """
    STRATEGIES[config.train.strategy].check_launch(environ)


def strategy_problems(config: Config) -> list[str]:
    """The settings of ``config`` its strategy cannot honour, one line each."""
    return STRATEGIES[config.train.strategy].config_problems(config)


def build_strategy(config: Config, accelerator: Any) -> Strategy:
    """The strategy object of ``train.strategy`` (``fsdp`` with one process is ``ddp``)."""
    check_group(accelerator.num_processes)
    name = config.train.strategy if accelerator.num_processes > 1 else DataParallel.name
    return STRATEGIES[name](accelerator)


__all__ = [
    "STRATEGIES",
    "DataParallel",
    "FullySharded",
    "Strategy",
    "build_strategy",
    "check_launch",
    "strategy_problems",
]
