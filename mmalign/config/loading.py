"""Reading a run config: YAML file, dict or :class:`Config`, plus ``--set`` overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mmalign.config.sections import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    objective_config,
)
from mmalign.config.strict_yaml import parse_yaml, read_yaml
from mmalign.config.tower import tower_config
from mmalign.errors import ConfigError, config_error, file_problem


def _parse_value(text: str, key: str) -> Any:
    return parse_yaml(text, "the value", f"--set {key}") if text != "" else ""


SCHEDULE_KEYS = ("train.steps", "train.epochs")
"""Two ways to give the length of a run; an override of one replaces the other."""


def _override_schedule(data: dict[str, Any], overrides: list[str]) -> None:
    """``--set train.steps=N`` drops the file's ``train.epochs`` (and the other way round),
    so the override is what runs."""
    keys = {override.split("=", 1)[0].strip() for override in overrides}
    train = data.get("train")
    for given, other in (SCHEDULE_KEYS, SCHEDULE_KEYS[::-1]):
        name = other.split(".")[1]
        if given in keys and other not in keys and isinstance(train, dict) and name in train:
            train[name] = None


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
        node[parts[-1]] = _parse_value(value, key.strip())  # !!python/... tags: refused
    return data


LIGHT_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
"""The sections whose validation needs no tower or objective class (so no torch)."""


def precheck_config(path: str | Path, overrides: list[str] | None = None) -> None:
    """The checks of :func:`load_config` that need no torch: the file (missing, a directory,
    not UTF-8, not YAML, a key given twice), the top-level sections, the keys of ``data``,
    ``train`` and ``eval``, the key names of ``model``, each tower's options
    (``model.towers.<modality>``, validated by the tower's options class,
    :mod:`mmalign.towers.options`) and the objective's (``model.objective``, by its options
    class, :mod:`mmalign.objectives.options`, against the towers' names). The command line
    runs them before importing torch, so a typo is reported in a fraction of a second.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        ...     _ = file.write("model: {}\\ntrain: {stepz: 3}\\n")
        >>> try:
        ...     precheck_config(file.name)
        ... except ConfigError as error:
        ...     print(error)  # doctest: +ELLIPSIS
        invalid config: train.stepz: unknown key (/...yaml); check the spelling against the ...
    """
    data = _read_file(Path(path))
    _override_schedule(data, overrides or [])
    apply_overrides(data, overrides or [])
    unknown = sorted(set(data) - {"model", *LIGHT_SECTIONS})
    if unknown:
        raise ConfigError(
            f"invalid config: {unknown[0]}: unknown section ({path}); the sections are model, "
            "data, train and eval"
        )
    for name, section in LIGHT_SECTIONS.items():
        try:
            section.model_validate(data.get(name) or {})
        except ValidationError as error:
            where = _source(error, str(path), overrides, prefix=f"{name}.")
            raise config_error(error, name, "config", where) from None
    _precheck_model(data.get("model"), str(path), overrides)


def _precheck_model(model: Any, path: str, overrides: list[str] | None) -> None:
    """The ``model`` keys :func:`precheck_config` checks: the names of its own keys, every
    tower's options and the objective's."""
    if model is None:
        raise ConfigError(
            f"invalid config: model: Field required ({path}); add a model section with its towers"
        )
    if not isinstance(model, dict):
        return
    unknown = sorted(set(model) - set(ModelConfig.model_fields))
    if unknown:
        key = f"model.{unknown[0]}"
        raise ConfigError(
            f"invalid config: {key}: unknown key ({_set_by(key, path, overrides)}); check the "
            "spelling against the documented fields"
        )
    towers = model.get("towers")
    for name, value in towers.items() if isinstance(towers, dict) else ():
        try:
            tower_config(value)
        except ValidationError as error:
            where = _source(error, path, overrides, prefix=f"model.towers.{name}.")
            raise config_error(error, f"model.towers.{name}", "config", where) from None
    if "objective" in model:
        modalities = list(towers) if isinstance(towers, dict) and towers else None
        _precheck_objective(model["objective"], modalities, path, overrides)


def _set_by(key: str, path: str, overrides: list[str] | None) -> str:
    """The ``--set`` overrides that set ``key`` (or a section above it), else the file."""
    setting = [
        f"--set {item}"
        for item in overrides or []
        if f"{key}.".startswith(item.split("=", 1)[0].strip() + ".")
    ]
    return ", ".join(setting) or path


def _precheck_objective(
    objective: Any, modalities: list[str] | None, path: str, overrides: list[str] | None
) -> None:
    """``model.objective`` validated by the options class of the objective it names (no
    torch), its modality fields against ``modalities`` (the towers' names) when given."""
    try:
        objective_config(objective, modalities)
    except ValidationError as error:
        where = _source(error, path, overrides, prefix="model.objective.")
        raise config_error(error, "model.objective", "config", where) from None


def _read_file(path: Path) -> dict[str, Any]:
    """The mapping of a YAML config file; a :class:`ConfigError` naming it otherwise."""
    problem = file_problem(path)
    if problem is not None:
        raise ConfigError(f"the config {problem} ({path}); pass the path of the YAML file")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the config is no mapping ({path}); write a mapping with model, data, train and "
            "eval sections"
        )
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
        data = _read_file(Path(source))
        name = str(source)
    else:
        data = json.loads(json.dumps(source))
        name = "dict"
    if not isinstance(data, dict):
        raise ConfigError(
            f"the config is no mapping ({name}); pass a mapping with model, data, train and "
            "eval sections"
        )
    _override_schedule(data, overrides or [])
    apply_overrides(data, overrides or [])
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise config_error(error, "", "config", _source(error, name, overrides)) from None
    return config


def _source(
    error: ValidationError, name: str, overrides: list[str] | None, prefix: str = ""
) -> str:
    """Where the fields of ``error`` were set: the ``--set`` overrides that set them (a typo
    there is not the file's), else the file ``name``."""
    fields = [prefix + ".".join(map(str, item["loc"])) for item in error.errors()]
    keys = {override: override.split("=", 1)[0].strip() for override in overrides or []}
    setting = [
        override
        for override, key in keys.items()
        if any(
            f"{field}.".startswith(f"{key}.") or f"{key}.".startswith(f"{field}.")
            for field in fields
        )
    ]
    return ", ".join(f"--set {override}" for override in setting) or name
