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

import os
import stat
from pathlib import Path
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


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an input file (``"does not exist"``, ``"is a directory,
    not a file"``, ``"is not a regular file (a device, FIFO or socket)"``), or ``None`` for a
    regular file. Only ``stat`` is asked: a FIFO or a device is never opened.

    Example:
        >>> file_problem("/dev/null"), file_problem("/"), file_problem("/no/such/file")
        ('is not a regular file (a device, FIFO or socket)', 'is a directory, not a file', \
'does not exist')
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:  # a name too long, a loop of links, a part that is a file
        return f"cannot be used: {error.strerror}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, FIFO or socket)"
    return None


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


SHOWN_PROBLEMS = 3
"""How many problems of one invalid config an error lists (then: ``and N more``)."""


def _todo(item: dict[str, Any], field: str) -> str:
    """What to do about one pydantic problem without a ``; what to do`` of its own."""
    if item["type"] == "missing":
        return f"add {field}"
    return f"give {field} a valid value (see its description in the docs)"


def config_error(error: Any, prefix: str, what: str, where: str | None = None) -> ConfigError:
    """A one-line :class:`ConfigError` for a pydantic ``ValidationError`` (see
    :func:`problems_error`); pydantic's links and echoed inputs are left out.

    Example:
        >>> from pydantic import BaseModel, ConfigDict, ValidationError
        >>> class Section(BaseModel):
        ...     model_config = ConfigDict(extra="forbid")
        ...     steps: int = 1
        >>> try:
        ...     Section.model_validate({"steps": "x"})
        ... except ValidationError as error:
        ...     print(config_error(error, "train", "config", "run.yaml"))
        invalid config: train.steps: Input should be a valid integer, unable to parse string \
as an integer (run.yaml); give train.steps a valid value (see its description in the docs)
    """
    lines = validation_problems(error, prefix)
    fields = [line.partition(": ")[0] for line in lines]
    todos = [_todo(item, field) for item, field in zip(error.errors(), fields, strict=True)]
    return problems_error(what, lines, where, todos)


def problems_error(
    what: str, problems: list[str], where: str | None = None, todos: list[str] | None = None
) -> ConfigError:
    """One line for ``problems`` (``field: problem[; what to do]`` each):
    ``invalid <what>: <field>: <problem> (<where>); <what to do>``, where is the file or
    ``--set`` override that set the field (default: the fields listed). The first
    :data:`SHOWN_PROBLEMS` problems are listed, the rest counted; what to do is the first
    problem's own advice, else ``todos[0]`` (default: fix the field).

    Example:
        >>> print(problems_error("training config", ["train.steps: set it; e.g. 100", "a: b"]))
        invalid training config: train.steps: set it, a: b (train.steps, a); e.g. 100
    """
    shown, advice = [], []
    for index, line in enumerate(problems):
        field, _, message = line.partition(": ")
        problem, _, todo = message.partition("; ")
        shown.append(f"{field}: {problem}" if message else field)
        advice.append(todo or (todos[index] if todos else f"fix {field}"))
    listed = ", ".join(shown[:SHOWN_PROBLEMS])
    if len(shown) > SHOWN_PROBLEMS:
        listed += f", and {len(shown) - SHOWN_PROBLEMS} more"
    place = where or ", ".join(line.partition(": ")[0] for line in shown[:SHOWN_PROBLEMS])
    return ConfigError(f"invalid {what}: {listed} ({place}); {advice[0]}")
