"""Reading a YAML config file strictly: a key given twice in one mapping, a file that is not
UTF-8 text and nesting too deep to read are :class:`~mmalign.errors.ConfigError`\\ s naming the
file (and the key and both lines), never a silent replacement or a traceback.

Example:
    >>> import yaml
    >>> yaml.load("train: {steps: 1}\\ntrain: {steps: 2}", Loader=StrictLoader)
    Traceback (most recent call last):
    ...
    mmalign.config.strict_yaml.DuplicateKeyError: key 'train' appears twice (lines 1 and 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmalign.errors import ConfigError


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently), naming the key and the lines (1-based) of both."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of ``node``; raises :class:`DuplicateKeyError` on a repeated key."""
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: SafeLoader words that error itself
                break
            if seen:
                raise DuplicateKeyError(
                    f"key '{key}' appears twice (lines {first_line[key]} and "
                    f"{key_node.start_mark.line + 1})"
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "the config file") -> Any:
    """The YAML document in ``path`` read with :class:`StrictLoader`; any reason it cannot be
    read as plain YAML text is a :class:`ConfigError` naming ``path``.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        ...     _ = file.write("train:\\n  steps: 1\\n  steps: 2\\n")
        >>> try:
        ...     read_yaml(Path(file.name))
        ... except ConfigError as error:
        ...     print(str(error).replace(file.name, "run.yaml"))
        key 'steps' appears twice (lines 2 and 3) in the config file (run.yaml); keep one of them
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} is not UTF-8 text at byte {error.start} ({path}); pass the YAML file"
        ) from None
    return parse_yaml(text, what, str(path))


def parse_yaml(text: str, what: str, where: str) -> Any:
    """``text`` read with :class:`StrictLoader`; a repeated key, nesting too deep to read or
    anything that is not plain YAML is a :class:`ConfigError` about ``what`` (``the config
    file``, ``the value``) naming ``where`` (its path, a ``--set`` override).

    Example:
        >>> parse_yaml("[1, 2]", "the value", "--set data.fields")
        [1, 2]
        >>> parse_yaml("[" * 100000, "the value", "--set train.lr")
        Traceback (most recent call last):
        ...
        mmalign.errors.ConfigError: the value is nested too deeply to read (--set train.lr); \
a config needs a few levels
    """
    try:
        return yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as error:
        raise ConfigError(f"{error} in {what} ({where}); keep one of them") from None
    except RecursionError:
        raise ConfigError(
            f"{what} is nested too deeply to read ({where}); a config needs a few levels"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{what} is not valid YAML: {_yaml_problem(error)} ({where}); write plain YAML "
            "(mappings, lists, strings, numbers; no tags such as !!python)"
        ) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where it is."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
