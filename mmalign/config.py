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

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration is invalid; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ObjectiveConfig(_Section):
    """The contrastive objective (see ``mmalign.objectives``)."""

    name: Literal["clip", "anchored", "sigmoid", "symile"] = "clip"
    pairs: list[tuple[str, str]] | None = None
    """Pairs of modalities for the pairwise objectives; ``None`` means every pair."""
    weights: dict[str, float] | None = None
    """Weight per pair, keyed ``"a-b"`` (pairwise) or per anchor modality (symile)."""
    anchor: str | None = None
    """Anchor modality for ``anchored``."""
    negatives: Literal["n", "n2"] = "n"
    """Symile negatives: ``n`` (shuffled rows, O(N)) or ``n2`` (all B^(M-1) combinations)."""
    block_size: int = Field(default=16384, ge=1)
    """Symile ``n2``: rows of the B^(M-1) candidate set processed per block."""
    gather_with_grad: bool = True
    """All-gather embeddings across processes with gradient (exact large-batch semantics)."""


class ModelConfig(_Section):
    """Towers, projections and temperature of an :class:`~mmalign.AlignmentModel`."""

    dim: int = Field(default=128, ge=1)
    towers: dict[str, dict[str, Any]]
    """Modality name -> tower config; ``type`` picks the tower, the rest is the tower's own."""
    objective: ObjectiveConfig = ObjectiveConfig()
    projection: Literal["linear", "mlp", "none"] = "linear"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    learn_logit_scale: bool = True
    logit_bias_init: float = -10.0
    freeze: list[str] = []
    """Modalities whose tower weights are frozen (locked-image tuning); projections still train."""

    @field_validator("towers")
    @classmethod
    def _towers_have_types(cls, towers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not towers:
            raise ValueError("needs at least one modality, e.g. {image: {type: image}}")
        for name, tower in towers.items():
            if not isinstance(tower, dict) or "type" not in tower:
                raise ValueError(
                    f"tower '{name}' needs a 'type:' (image, text, audio, graph, tabular)"
                )
        return towers


class DataConfig(_Section):
    """Where the shards are and how records map to modalities."""

    train: str | list[str] | None = None
    """Shards: brace notation, a directory, a list, or any URL webdataset opens."""
    val: str | list[str] | None = None
    test: str | list[str] | None = None
    fields: dict[str, str] = {}
    """Modality name -> file extension(s) in the record, e.g. ``{image: png, text: txt}``;
    alternatives separated by ``;`` (``jpg;png``)."""
    label_field: str | None = "cls"
    """Extension of an integer class label kept in the batch (for zero-shot validation)."""
    classes: str | None = None
    """A ``classes.json`` with class names and prompt templates (zero-shot validation)."""
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = True
    epoch_samples: int | None = None
    seed: int = 0


class EvalConfig(_Section):
    """Periodic validation during training (on ``data.val``)."""

    every: int = Field(default=0, ge=0)
    """Validate every N optimizer steps (0: only at the end)."""
    max_samples: int = Field(default=2000, ge=1)
    """Validation samples read per validation (all processes together)."""
    retrieval_pairs: list[tuple[str, str]] | None = None
    """(query, gallery) modality pairs for recall@k; ``None``: every ordered pair.
    Symile models report N-way recall (each modality from the product of the others)."""
    zeroshot_modality: str | list[str] | None = None
    """Query modality (or modalities, scored jointly) classified zero-shot from the class
    prompts of ``data.classes``, with the labels of ``data.label_field``."""
    zeroshot_text: str | None = None
    """Text modality that encodes the prompts (default: the first text tower)."""
    zeroshot_language: str | None = None
    """Language of ``data.classes`` to use; ``all`` pools every language's prompts."""
    best_metric: str = "val/loss"
    """Metric that picks the ``best`` checkpoint, e.g. ``val/R@1/mean``, ``val/zeroshot/top1``."""
    best_mode: Literal["min", "max"] = "min"

    @field_validator("best_metric")
    @classmethod
    def _validation_metric(cls, name: str) -> str:
        if not name.startswith("val/"):
            raise ValueError(
                f"'{name}' is not a validation metric; use val/loss, val/R@1/mean, "
                "val/zeroshot/top1 or another val/... key of metrics.jsonl"
            )
        return name


class TrainConfig(_Section):
    """The optimization loop (``mmalign train``)."""

    steps: int | None = Field(default=100, ge=1)
    """Optimizer steps (each of ``data.batch_size x accumulate x processes`` samples)."""
    epochs: int | None = Field(default=None, ge=1)
    """Instead of ``steps``: passes over ``data.epoch_samples`` samples per process (wins over
    ``steps``)."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay of weight matrices (never biases, norms, embeddings, temperature)."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    warmup: int = Field(default=0, ge=0)
    """Linear warmup steps before the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    accumulate: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step; negatives span all of them (contrastive-exact)."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision through Accelerate (fp16 uses a gradient scaler)."""
    seed: int = 0
    """Seed of the model initialization, dropout and the objective's shuffles."""
    output: str = "runs/default"
    """Run directory: config, logs, checkpoints and the final model."""
    log_every: int = Field(default=10, ge=1)
    """Write training metrics every N steps."""
    save_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0: only at the end and at new best validations)."""
    keep_last: int = Field(default=2, ge=1)
    """Step checkpoints kept (the ``best`` one is kept apart)."""
    max_nonfinite: int = Field(default=5, ge=1)
    """Consecutive non-finite losses that stop the run."""
    tensorboard: bool = True
    plots: bool = True
    """Write loss / temperature / validation PNG plots at the end."""
    profile: bool = False
    """Synchronize the device around each part of a step to time it exactly (slower)."""
    find_unused_parameters: bool = True
    """DDP: allow towers without gradient in a step (a modality absent from a batch)."""


class Config(_Section):
    """A whole run: ``model``, ``data``, ``train``, ``eval``."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-compatible data."""
        return json.loads(self.model_dump_json())


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; check the spelling against the documented fields"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict in place.

    Example:
        >>> apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "data.batch_size=8"])
        {'train': {'lr': 0.5}, 'data': {'batch_size': 8}}
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key.sub=value")
        key, value = override.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{override}': '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as error:  # also !!python/... tags, which safe_load refuses
            raise ConfigError(
                f"override '{override}': the value is not plain YAML: {error}"
            ) from None
    return data


def load_config(
    source: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None
) -> Config:
    """Load and validate a config from a YAML path, a dict or a :class:`Config`.

    Relative shard and file paths stay as written (relative to the working directory).
    """
    if isinstance(source, Config):
        if not overrides:
            return source
        source = source.to_dict()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        name = str(path)
    else:
        data = json.loads(json.dumps(source))
        name = "dict"
    if not isinstance(data, dict):
        raise ConfigError(f"config {name} must be a mapping with model/data/train/eval sections")
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, name)) from None
