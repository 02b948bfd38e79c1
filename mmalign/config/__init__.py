"""Typed configuration for mmalign runs.

One YAML file (or the same dict in Python) describes a run with four fixed top-level sections:
``model``, ``data``, ``train`` and ``eval``. Unknown keys, wrong types and missing files are
errors that name the dotted field (``data.batch_size``) and say what to do.

Example:
    >>> from mmalign.config import load_config
    >>> cfg = load_config({"model": {"dim": 32, "towers": {"labs": {"type": "tabular",
    ...     "in_features": 4}}}}, overrides=["train.steps=10"])
    >>> cfg.train.steps
    10
"""

from mmalign.config.loading import apply_overrides, load_config
from mmalign.config.sections import (
    Config,
    DataConfig,
    DataSource,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    field_error,
    objective_config,
)
from mmalign.config.tower import LoraSettings, TowerConfig, TrainableConfig, tower_config
from mmalign.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "EvalConfig",
    "LoraSettings",
    "ModelConfig",
    "ObjectiveConfig",
    "TowerConfig",
    "TrainConfig",
    "TrainableConfig",
    "apply_overrides",
    "field_error",
    "load_config",
    "objective_config",
    "tower_config",
]
