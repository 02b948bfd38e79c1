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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mmalign.errors import ConfigError, config_error
from mmalign.registry import OBJECTIVES

__all__ = ["Config", "ConfigError", "ObjectiveConfig", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def field_error(title: str, field: str, message: str, value: Any = None) -> ValidationError:
    """A pydantic ``ValidationError`` of one field; raised inside a validator, pydantic puts
    it under the enclosing field's location (``model.objective.<field>``)."""
    error = PydanticCustomError("invalid_value", message)  # type: ignore[arg-type]
    return ValidationError.from_exception_data(
        title, [InitErrorDetails(type=error, loc=(field,), input=value)]
    )


class ObjectiveConfig(_Section):
    """Base of every objective's own config; ``name`` picks the objective.

    Each objective (``mmalign.objectives``) subclasses this with its own fields and sets it
    as its ``config_class``. When the config is loaded, :meth:`check_modalities` checks the
    fields that name modalities against the model's towers.
    """

    name: str = "clip"
    """A registered objective: ``clip``, ``anchored``, ``sigmoid``, ``symile`` or your own."""
    weights: dict[str, float] | None = None
    """Weight per term, keyed ``"a-b"`` (pairwise terms) or by anchor modality (symile)."""
    gather_with_grad: bool = True
    """All-gather embeddings across processes with gradient (exact large-batch semantics)."""

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        """Names of the loss terms for these modalities (the keys of ``weights``)."""
        raise NotImplementedError

    def check_modalities(self, modalities: Sequence[str]) -> None:
        """Raise ``field_error`` for a field that does not fit the model's ``modalities``."""
        names = self.term_names(modalities)
        unknown = sorted(set(self.weights or {}) - set(names))
        if unknown:
            raise field_error(
                type(self).__name__,
                "weights",
                f"keys {unknown} name no term of '{self.name}' for modalities "
                f"{list(modalities)}; use keys from {names}",
                self.weights,
            )
        negative = sorted(key for key, weight in (self.weights or {}).items() if weight < 0)
        if negative:
            raise field_error(
                type(self).__name__, "weights", f"{negative} are negative; use >= 0", self.weights
            )

    @model_validator(mode="after")
    def _fits_the_towers(self, info: ValidationInfo) -> ObjectiveConfig:
        modalities = (info.context or {}).get("modalities")
        if modalities is not None:
            self.check_modalities(modalities)
        return self


def objective_config(value: Any, modalities: Sequence[str] | None = None) -> ObjectiveConfig:
    """Validate an objective section with the config class of the objective it names.

    Example:
        >>> objective_config({"name": "symile", "negatives": "n2"}).negatives
        'n2'
    """
    if isinstance(value, ObjectiveConfig):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise field_error("objective", "name", "must be a mapping with a 'name:'", value)
    name = value.get("name", "clip")
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise field_error(
            "objective",
            "name",
            f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES.names())}",
            name,
        )
    config_class = OBJECTIVES.get(name).config_class
    context = None if modalities is None else {"modalities": list(modalities)}
    return config_class.model_validate({**value, "name": name}, context=context)


class ModelConfig(_Section):
    """Towers, projections and temperature of an :class:`~mmalign.AlignmentModel`."""

    dim: int = Field(default=128, ge=1)
    towers: dict[str, dict[str, Any]]
    """Modality name -> tower config; ``type`` picks the tower, the rest is the tower's own."""
    objective: SerializeAsAny[ObjectiveConfig] = Field(
        default_factory=lambda: {"name": "clip"}, validate_default=True
    )
    """The objective: ``name`` picks it, the other keys are its own (``mmalign.objectives``)."""
    projection: Literal["linear", "mlp", "none"] = "linear"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    learn_logit_scale: bool = True
    logit_bias_init: float = -10.0
    freeze: list[str] = []
    """Modalities whose tower weights are frozen (locked-image tuning); projections still train."""
    matryoshka: list[int] | None = None
    """Matryoshka prefixes, ascending, the last equal to ``dim`` (e.g. ``[16, 32, 64, 128]``):
    the objective is applied to each renormalized prefix (:mod:`mmalign.objectives.matryoshka`)."""
    matryoshka_weights: list[float] | None = None
    """One weight (>= 0) per ``matryoshka`` prefix; default 1 each."""

    @model_validator(mode="after")
    def _matryoshka_prefixes(self) -> ModelConfig:
        dims, weights = self.matryoshka, self.matryoshka_weights
        if dims is None:
            if weights is not None:
                raise ValueError("matryoshka_weights needs matryoshka (the prefixes)")
            return self
        if not dims or dims[0] < 1 or dims != sorted(set(dims)):
            raise ValueError(f"matryoshka must be ascending positive sizes, got {dims}")
        if dims[-1] != self.dim:
            raise ValueError(f"matryoshka must end with model.dim ({self.dim}), got {dims}")
        if weights is not None and (
            len(weights) != len(dims) or min(weights) < 0 or sum(weights) <= 0
        ):
            raise ValueError(
                f"matryoshka_weights needs one weight >= 0 per prefix {dims} (not all 0), "
                f"got {weights}"
            )
        return self

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

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_by_name(cls, value: Any, info: ValidationInfo) -> ObjectiveConfig:
        return objective_config(value, list(info.data.get("towers") or {}) or None)


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
        raise config_error(error, "", f"config ({name})") from None
