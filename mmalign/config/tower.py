"""The base of every tower's config (``model.towers.<modality>``) and its validation through
the tower registry: ``type`` picks the tower, whose ``config_class`` (a :class:`TowerConfig`
subclass, in the tower's options module :mod:`mmalign.towers.options`) validates the rest.

The keys every tower takes choose what of it trains: ``trainable: {last_blocks: N}``
(:class:`TrainableConfig`) or ``lora: {...}`` (:class:`LoraSettings`, applied by
:mod:`mmalign.towers.lora`), and ``merge_lora``.

Example:
    >>> config = tower_config({"type": "tabular", "in_features": 3})
    >>> type(config).__name__, config.in_features
    ('TabularTowerConfig', 3)
    >>> tower_config({"type": "tabular", "in_features": 3, "trainable": {"last_blocks": 1}},
    ...     ).trainable.last_blocks
    1
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mmalign.registry import TOWER_OPTIONS


class TrainableConfig(BaseModel):
    """``model.towers.X.trainable``: the part of a pretrained tower that trains."""

    model_config = ConfigDict(extra="forbid")
    last_blocks: int = Field(ge=0)
    """Blocks counted from the output that train (with the head); the others are frozen."""


class LoraSettings(BaseModel):
    """``model.towers.X.lora``: rank, scaling, dropout and target modules of the adapters."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=8, ge=1)
    """Rank of each adapter (``>= 1``)."""
    alpha: float = Field(default=8.0, gt=0, allow_inf_nan=False)
    """Scaling numerator: the update is ``alpha / r * B A``."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input, in ``[0, 1)``."""
    targets: list[str] | None = Field(default=None, min_length=1)
    """Module names to adapt; ``None``: the tower kind's default (:mod:`mmalign.towers.lora`)."""


class TowerConfig(BaseModel):
    """Base of every tower's own config; ``type`` picks the tower. ``trainable``, ``lora``
    and ``merge_lora`` choose what of it trains.

    A dump holds ``type`` and the keys that were set (the config as written, plus what
    ``save_pretrained`` resolved), so it validates again to the same config: a tower's
    validators may tell a key given from a default (``model_fields_set``).
    """

    model_config = ConfigDict(extra="forbid")
    type: str
    trainable: TrainableConfig | None = None
    lora: LoraSettings | None = None
    merge_lora: bool = False

    @model_validator(mode="after")
    def _tuning(self) -> TowerConfig:
        if self.lora is not None and self.trainable is not None:
            raise ValueError(
                "lora and trainable both choose what trains (LoRA freezes the base weights); "
                "keep one"
            )
        if self.merge_lora and self.lora is None:
            raise ValueError("merge_lora: true needs lora: {r: ...}; remove merge_lora")
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {
            key: value for key, value in data.items() if key in {"type", *self.model_fields_set}
        }

    def tunes(self) -> str | None:
        """The key that trains part of the tower (``trainable`` or ``lora``), ``None``."""
        return "trainable" if self.trainable else "lora" if self.lora else None


def tower_config(value: Any) -> TowerConfig:
    """Validate one tower's config with the options class of the tower type it names
    (:data:`~mmalign.registry.TOWER_OPTIONS`: no torch is imported; a ``ValidationError``
    whose fields are the tower's keys; pydantic puts them under ``model.towers.<modality>``).
    A :class:`TowerConfig` is taken as it is."""
    if isinstance(value, TowerConfig):
        return value
    if not isinstance(value, dict):
        raise _type_error("a tower config is a mapping with a 'type:' and the tower's keys", value)
    if not isinstance(value.get("type"), str):
        raise _type_error("needs a 'type:'", value.get("type"))
    if value["type"] not in TOWER_OPTIONS:
        raise _type_error(f"unknown tower type {value['type']!r}", value["type"])
    config_class: type[TowerConfig] = TOWER_OPTIONS.get(value["type"])
    return config_class.model_validate(value)


def _type_error(problem: str, value: Any) -> ValidationError:
    message = f"{problem}; known: {', '.join(TOWER_OPTIONS.names())}"
    error = PydanticCustomError("invalid_value", message)
    return ValidationError.from_exception_data(
        "tower config", [InitErrorDetails(type=error, loc=("type",), input=value)]
    )
