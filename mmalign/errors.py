"""Errors a user can fix, and the one way mmalign words config errors.

Every error whose message tells the user what to change (a config field, a busy directory, an
unreadable checkpoint or export) derives from :class:`UserError`; the command line prints
those as one line instead of a traceback. This module imports nothing heavy, so the command
line can catch them before torch or pydantic load. :class:`SampleError` is the one error
that is about data, not the user's command: a tower refusing one sample for a reason the data
loader counts on its own.

Example:
    >>> str(ConfigError("data.batch_size: must be >= 1"))
    'data.batch_size: must be >= 1'
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """An error the user can fix; its message says what was wrong, where, and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration is invalid; the message names the field and the fix."""


class SampleError(ValueError):
    """A tower's ``preprocess`` refuses a sample for a reason of its own, which the data loader
    counts as ``skipped/<reason>`` instead of ``skipped/preprocess``: ``nonfinite`` (NaN or
    Inf values the tower has no use for) or ``bad_channels`` (a channel count the tower was
    not configured for).

    Example:
        >>> error = SampleError("nonfinite", "audio: 3 NaN samples")
        >>> error.reason, str(error)
        ('nonfinite', 'audio: 3 NaN samples')
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validation_problems(error: Any, prefix: str = "") -> list[str]:
    """``field: message`` lines of a pydantic ``ValidationError``, fields under ``prefix``.

    Example:
        >>> from pydantic import BaseModel, ConfigDict, ValidationError
        >>> class Section(BaseModel):
        ...     model_config = ConfigDict(extra="forbid")
        ...     steps: int = 1
        >>> try:
        ...     Section.model_validate({"stepz": 2})
        ... except ValidationError as error:
        ...     validation_problems(error, "train")
        ['train.stepz: unknown key; check the spelling against the documented fields']
    """
    lines = []
    for item in error.errors():
        parts = [prefix] if prefix else []
        parts += [str(part) for part in item["loc"]]
        field = ".".join(parts) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; check the spelling against the documented fields"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"{field}: {message}")
    return lines


def config_error(error: Any, prefix: str, what: str) -> ConfigError:
    """A :class:`ConfigError` listing every problem of a pydantic ``ValidationError``.

    One problem stays on one line (``invalid <what>: field: message``); several are listed
    one per line under ``invalid <what>:``.
    """
    problems = validation_problems(error, prefix)
    if len(problems) == 1:
        return ConfigError(f"invalid {what}: {problems[0]}")
    return ConfigError("\n  ".join([f"invalid {what}:", *problems]))
