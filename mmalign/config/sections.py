"""The sections of a run config (``model``, ``data``, ``train``, ``eval``) and the objective
config base class; :mod:`mmalign.config` re-exports them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mmalign.config.extensions import check_alternatives
from mmalign.config.terms import TermConfig
from mmalign.config.tower import TowerConfig, tower_config
from mmalign.registry import OBJECTIVE_OPTIONS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def field_error(title: str, field: str, message: str, value: Any = None) -> ValidationError:
    """A pydantic ``ValidationError`` of one field; raised inside a validator, pydantic puts
    it under the enclosing field's location (``model.objective.<field>``)."""
    error = PydanticCustomError("invalid_value", message)
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
    terms: list[TermConfig] = []
    """Auxiliary terms added to this objective's loss (``two_view``, ``distill``, ``queue``;
    :mod:`mmalign.objectives.terms`), each ``{type, weight, ...}``."""

    def term_names(self, modalities: Sequence[str]) -> list[str]:
        """Names of the loss terms for these modalities (the keys of ``weights``)."""
        raise NotImplementedError

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        bad = sorted(key for key, weight in (weights or {}).items() if not math.isfinite(weight))
        if bad:
            raise ValueError(f"{bad} are NaN or infinite; use finite weights >= 0")
        return weights

    def follow_training(self, precision: str) -> None:
        """Fill the fields whose default follows ``train.precision`` (none here; ``symile``'s
        ``block_precision`` does). :class:`Config` calls it once the run config is valid.

        Example:
            >>> ObjectiveConfig().follow_training("bf16")
        """

    def check_modalities(self, modalities: Sequence[str]) -> None:
        """Raise ``field_error`` for a field that does not fit the model's ``modalities``."""
        check_terms(self.terms, modalities)
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
        if names and all((self.weights or {}).get(name, 1.0) == 0 for name in names):
            raise field_error(
                type(self).__name__,
                "weights",
                f"every term ({', '.join(names)}) has weight 0, so nothing would be learned; "
                "give at least one term a positive weight",
                self.weights,
            )

    @model_validator(mode="after")
    def _fits_the_towers(self, info: ValidationInfo) -> ObjectiveConfig:
        modalities = (info.context or {}).get("modalities")
        if modalities is not None:
            self.check_modalities(modalities)
        return self


def check_terms(terms: Sequence[Any], modalities: Sequence[str]) -> None:
    """Raise ``field_error`` (``terms``) for a term on an unknown modality or a name used twice.

    Example:
        >>> check_terms([], ["image", "text"])
    """
    names = [term.name for term in terms]
    for term in terms:
        modality = getattr(term, "modality", None)
        if modality is not None and modality not in modalities:
            raise field_error(
                "ObjectiveConfig",
                "terms",
                f"{term.name}: no tower named {modality!r}; use one of {list(modalities)}",
                modality,
            )
        if names.count(term.name) > 1:
            raise field_error(
                "ObjectiveConfig", "terms", f"{term.name} is given twice; keep one", term.name
            )


def objective_config(value: Any, modalities: Sequence[str] | None = None) -> ObjectiveConfig:
    """Validate an objective section with the options class of the objective it names
    (:data:`~mmalign.registry.OBJECTIVE_OPTIONS`: no torch is imported); with ``modalities``
    the fields that name modalities are checked against them.

    Example:
        >>> objective_config({"name": "symile", "negatives": "n2"}).negatives
        'n2'
    """
    if isinstance(value, ObjectiveConfig):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise field_error("objective", "name", "must be a mapping with a 'name:'", value)
    name = value.get("name", "clip")
    if not isinstance(name, str) or name not in OBJECTIVE_OPTIONS:
        raise field_error(
            "objective",
            "name",
            f"unknown objective {name!r}; registered: {', '.join(OBJECTIVE_OPTIONS.names())}",
            name,
        )
    config_class: type[ObjectiveConfig] = OBJECTIVE_OPTIONS.get(name)
    context = None if modalities is None else {"modalities": list(modalities)}
    return config_class.model_validate({**value, "name": name}, context=context)


class ModelConfig(_Section):
    """Towers, projections and temperature of an :class:`~mmalign.AlignmentModel`."""

    dim: int = Field(default=128, ge=1)
    towers: dict[str, Annotated[SerializeAsAny[TowerConfig], BeforeValidator(tower_config)]]
    """Modality name -> tower config; ``type`` picks the tower (and its config class, through
    the tower registry), the rest is the tower's own."""
    objective: SerializeAsAny[ObjectiveConfig] = Field(
        default_factory=lambda: {"name": "clip"}, validate_default=True
    )
    """The objective: ``name`` picks it, the other keys are its own (``mmalign.objectives``)."""
    projection: Literal["linear", "mlp", "none"] = "linear"
    logit_scale_init: float | Literal["from_checkpoint"] | None = None
    """Initial log temperature; ``from_checkpoint``: the ``logit_scale`` of the towers' CLIP
    checkpoint; ``None``: that one when two towers load one CLIP checkpoint holding it, else
    ``log(1/0.07)``. A saved model's config holds the resolved number."""
    logit_scale_max: float = Field(default=math.log(100.0), allow_inf_nan=False)
    learn_logit_scale: bool = True
    logit_bias_init: float = Field(default=-10.0, allow_inf_nan=False)
    freeze: list[str] = []
    """Modalities whose tower weights are frozen (locked-image tuning); projections still train."""
    matryoshka: list[int] | None = None
    """Matryoshka prefixes, ascending, the last equal to ``dim`` (e.g. ``[16, 32, 64, 128]``):
    the objective is applied to each renormalized prefix (:mod:`mmalign.objectives.matryoshka`)."""
    matryoshka_weights: list[FiniteFloat] | None = None
    """One finite weight (>= 0) per ``matryoshka`` prefix; default 1 each."""

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

    @model_validator(mode="after")
    def _frozen_towers_do_not_train(self) -> ModelConfig:
        for name in self.freeze:
            tuned = self.towers[name].tunes() if name in self.towers else None
            if tuned:
                raise field_error(
                    "ModelConfig",
                    "freeze",
                    f"names '{name}' but model.towers.{name}.{tuned} trains part of it; "
                    f"remove '{name}' from freeze or the {tuned} key",
                    self.freeze,
                )
        return self

    @field_validator("logit_scale_init")
    @classmethod
    def _finite_logit_scale(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number; e.g. {math.log(1 / 0.07):.4f}")
        return value

    @field_validator("towers")
    @classmethod
    def _towers_not_empty(cls, towers: dict[str, TowerConfig]) -> dict[str, TowerConfig]:
        if not towers:
            raise ValueError("needs at least one modality, e.g. {image: {type: image}}")
        return towers

    def modalities_of_type(self, tower_type: str) -> list[str]:
        """The modalities whose tower is of type ``tower_type``, in config order.

        Example:
            >>> ModelConfig(towers={"a": {"type": "tabular", "in_features": 2},
            ...     "b": {"type": "text"}}).modalities_of_type("text")
            ['b']
        """
        return [name for name, tower in self.towers.items() if tower.type == tower_type]

    def modality_named(self, name: str) -> str | None:
        """``name`` if it is a modality, else the first modality whose tower is of type
        ``name`` (``"text"``, ``"image"``...), else ``None``.

        Example:
            >>> ModelConfig(towers={"caption": {"type": "text"}}).modality_named("text")
            'caption'
        """
        if name in self.towers:
            return name
        of_type = self.modalities_of_type(name)
        return str(of_type[0]) if of_type else None

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_by_name(cls, value: Any, info: ValidationInfo) -> ObjectiveConfig:
        return objective_config(value, list(info.data.get("towers") or {}) or None)


_RESERVED_SOURCE_NAMES = ("seen", "used", "skipped", "dropped", "faults")


class DataSource(_Section):
    """One weighted source of ``data.train`` (a list of these mixes several datasets)."""

    shards: str | list[str]
    """The source's shards (any form ``data.train`` accepts)."""
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Relative weight: the share of the records drawn from this source (resampled streams)
    or of the interleaving (finite epochs) is ``weight / sum of weights``."""
    name: str | None = None
    """Name in the counters ``data/<name>/used`` and the plan (default ``source<i>``)."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (
            not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in _RESERVED_SOURCE_NAMES
        ):
            raise ValueError(
                f"{name!r} must be letters, digits, '_', '.' or '-' and none of "
                f"{', '.join(_RESERVED_SOURCE_NAMES)}"
            )
        return name


class DataConfig(_Section):
    """Where the shards are and how records map to modalities."""

    train: str | list[str] | list[DataSource] | None = None
    """Shards: brace notation, a directory, a list, or any URL webdataset opens; or a list of
    weighted sources ``{shards, weight, name}`` mixed by weight (``docs/data_sources.md``)."""
    val: str | list[str] | None = None
    test: str | list[str] | None = None
    fields: dict[str, Annotated[str, AfterValidator(check_alternatives)]] = {}
    """Modality name -> file extension(s) in the record, e.g. ``{image: png, text: txt}``;
    alternatives separated by ``;`` (``jpg;png``), none empty."""
    label_field: str | None = "cls"
    """Extension of an integer class label kept in the batch (for zero-shot validation)."""
    classes: str | None = None
    """A ``classes.json`` with class names and prompt templates (zero-shot validation)."""
    group_field: str | None = None
    """Extension holding each record's group (``cls``, ``txt``, ``json:<key>``): rows of one
    group are positives of each other (``model.objective.positives``); strings are hashed."""
    views: dict[str, Literal["sample", "expand"]] = {}
    """Modality -> ``sample`` (one of a record's several items per pass) or ``expand`` (one
    row per item, one group); see :mod:`mmalign.data.views`."""
    negatives: str | None = None
    """Modality whose mined ``neg<i>.<ext>`` files (``mmalign prep mine-negatives``) become
    extra training rows; ``model.objective.hard_negatives: true`` uses them."""
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = True
    epoch_samples: int | None = Field(default=None, ge=1)
    seed: int = 0
    max_member_bytes: int = Field(default=64 * 2**20, ge=1)
    """Per-record limit: largest file read out of a tar shard (checked from its tar header,
    before reading; a GNU-sparse member counts its expanded size). Larger: skipped as
    ``member_too_large``."""
    max_decoded_bytes: int = Field(default=128 * 2**20, ge=1)
    """Per-record limit: largest decoded audio clip (float32), image (pixels x bands) or npz
    (array bytes), checked from the file's header before decoding; larger: ``too_large``."""
    audio_sample_rates: tuple[int, int] = (1000, 384_000)
    """Per-record limit: lowest and highest audio sample rate in Hz (from the header, before
    decoding); outside: ``bad_sample_rate``."""
    max_audio_seconds: float = Field(default=600.0, gt=0)
    """Per-record limit: longest audio clip (from the header, before decoding); longer:
    ``too_long``."""

    max_video_seconds: float = Field(default=600.0, gt=0)
    """Per-record limit: longest video (from the container header, before decoding); longer:
    ``too_long``."""
    max_video_frames: int = Field(default=36_000, ge=1)
    """Per-record limit: most frames of a video (the header's count, or duration x rate),
    before decoding; more: ``too_long``."""
    max_video_pixels: int = Field(default=3840 * 2160, ge=1)
    """Per-record limit: largest video frame (width x height from the header), before
    decoding; larger: ``too_large``."""
    max_signal_samples: int = Field(default=10_000_000, ge=1)
    """Per-record limit: longest signal (samples: the last axis of a 1- or 2-axis ``npy``,
    from its header; rows of a ``csv``), before loading; longer: ``too_long``."""
    max_signal_channels: int = Field(default=4096, ge=1)
    """Per-record limit: most channels (the first axis of a 2-axis ``npy``, from its header;
    columns of a ``csv``), before loading; more: ``too_large``."""

    read_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds an ``http(s)://`` shard may go without sending a byte before the read is
    retried (``docs/data_sources.md``)."""
    retries: int = Field(default=3, ge=0)
    """Retries of a shard whose reading fails (connection refused or dropped, timeout, HTTP
    error, failed ``pipe:`` command) before it is skipped as ``unreachable_shard``."""
    retry_backoff: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Seconds before the first retry, doubled for each further one."""

    @field_validator("train")
    @classmethod
    def _unique_source_names(
        cls, train: str | list[str] | list[DataSource] | None
    ) -> str | list[str] | list[DataSource] | None:
        if isinstance(train, list) and train and isinstance(train[0], DataSource):
            names = [getattr(s, "name", None) or f"source{i}" for i, s in enumerate(train)]
            if len(set(names)) < len(names):
                raise ValueError(f"the sources' names must differ; got {names}")
        return train

    @field_validator("audio_sample_rates")
    @classmethod
    def _rate_range(cls, rates: tuple[int, int]) -> tuple[int, int]:
        if not 0 < rates[0] <= rates[1]:
            raise ValueError(f"must be [lowest, highest] Hz, 0 < lowest <= highest; got {rates}")
        return rates


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
    """Metric that picks the ``best`` checkpoint, e.g. ``val/instance/R@1/mean`` (a hit is the
    paired item), ``val/class/R@1/mean`` (any item of the class; needs labels),
    ``val/zeroshot/top1``."""
    best_mode: Literal["min", "max"] = "min"

    @field_validator("best_metric")
    @classmethod
    def _validation_metric(cls, name: str) -> str:
        if not name.startswith("val/"):
            raise ValueError(
                f"'{name}' is not a validation metric; use val/loss, val/instance/R@1/mean, "
                "val/class/R@1/mean, val/zeroshot/top1 or another val/... key of metrics.jsonl"
            )
        unnamed_level = re.fullmatch(r"val/((?:R@\d+|mAP)/.+)", name)
        if unnamed_level:
            rest = unnamed_level.group(1)
            raise ValueError(
                f"'{name}' does not say its level; use val/instance/{rest} (a hit is the "
                f"paired item) or val/class/{rest} (any item of the class)"
            )
        return name


class TrainConfig(_Section):
    """The optimization loop (``mmalign train``)."""

    steps: int | None = Field(default=100, ge=1)
    """Optimizer steps (each of ``data.batch_size x accumulate x processes`` samples)."""
    epochs: int | None = Field(default=None, ge=1)
    """Instead of ``steps``: passes over ``data.epoch_samples`` samples per process. Set one
    of the two; a ``--set`` override of either replaces the other one of the file."""
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    """Decoupled weight decay of weight matrices (never biases, norms, embeddings, temperature)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's moment decay rates, each in [0, 1)."""
    eps: float = Field(default=1e-6, gt=0, allow_inf_nan=False)
    warmup: int = Field(default=0, ge=0)
    """Linear warmup steps before the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    accumulate: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step; negatives span all of them (contrastive-exact)."""
    spill_inputs: Literal["auto"] | bool = "auto"
    """With ``accumulate`` > 1: write each micro-batch's input tensors to a temporary
    safetensors file between the two passes of exact accumulation, so peak memory stays flat
    in the global batch (bit-identical gradients; the files go at the end of each step).
    ``auto``: when a step's inputs exceed 64 MiB; ``true``: always; ``false``: never."""
    grad_clip: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)
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
    max_abs_weight: float = Field(default=1e4, gt=0, allow_inf_nan=False)
    """Largest magnitude a parameter may reach: an optimizer step that leaves any parameter
    (or the temperature) non-finite or beyond it stops the run as diverged, unsaved."""
    tensorboard: bool = True
    plots: bool = True
    """Write loss / temperature / validation PNG plots at the end."""
    profile: bool = False
    """Synchronize the device around each part of a step to time it exactly (slower)."""
    find_unused_parameters: bool = True
    """DDP: allow towers without gradient in a step (a modality absent from a batch)."""
    log_sample_keys: bool = False
    """Write the record keys of every micro-batch each process trains on to
    ``output/sample_keys/rank-00000.jsonl``, the rank in five digits
    (:mod:`mmalign.training.sample_keys`)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several processes share the model: ``ddp`` (each holds all of it, Accelerate's
    DistributedDataParallel) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state
    sharded, checkpoints saved sharded; see docs/fsdp.md). One process ignores it."""
    gradient_checkpointing: bool = False
    """Recompute each tower block's activations in the backward pass (less memory, more
    compute; :mod:`mmalign.towers.grad_checkpointing` says which towers support it)."""
    compile: bool | str = False
    """``torch.compile`` each tower (not the loss): ``true`` with the default backend
    (inductor), or a backend name (``aot_eager``, ...); the first steps are slower."""
    host_memory: Literal["auto", "keep", "release"] = "auto"
    """What glibc does with host memory a step frees (:mod:`mmalign.training.host_memory`):
    ``keep`` it for the next step (faster CPU steps; the resident size stays at its peak),
    ``release`` it to the OS at once (the resident size follows the memory in use), ``auto``:
    ``release`` with ``gradient_checkpointing`` and from the first step that spills its inputs
    (``spill_inputs``), else ``keep``."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay in (0, 1]: a tower parameter at depth ``d`` of ``n``
    blocks trains at ``lr * layer_decay ** (n + 1 - d)`` (:mod:`mmalign.training.optim`)."""
    ema: float | None = None
    """Decay in [0, 1) of an exponential moving average of the weights, used for validation
    and saved as the final model (:mod:`mmalign.training.ema`); ``null``: none."""

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        """``epochs`` set: ``steps`` must be unset (it becomes null); both set is an error."""
        if not isinstance(data, dict) or data.get("epochs") is None:
            return data
        if data.get("steps") is not None:
            raise ValueError(
                f"steps ({data['steps']}) and epochs ({data['epochs']}) are both set; keep one "
                "and set the other to null (a --set of one replaces the other)"
            )
        return {**data, "steps": None}

    @field_validator("layer_decay")
    @classmethod
    def _decay_in_range(cls, decay: float | None) -> float | None:
        if decay is not None and not 0 < decay <= 1:
            raise ValueError(f"{decay} is outside (0, 1]; e.g. 0.75 (1: no decay)")
        return decay

    @field_validator("ema")
    @classmethod
    def _ema_in_range(cls, decay: float | None) -> float | None:
        if decay is not None and not 0 <= decay < 1:
            raise ValueError(f"{decay} is outside [0, 1); e.g. 0.999 (null: no average)")
        return decay

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"{list(betas)}: each must be in [0, 1), e.g. [0.9, 0.98]")
        return betas


class Config(_Section):
    """A whole run: ``model``, ``data``, ``train``, ``eval``."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _objective_follows_training(self) -> Config:
        self.model.objective.follow_training(self.train.precision)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-compatible data."""
        return json.loads(self.model_dump_json())
