"""A trained demo model with its run directory, config and training figures: what the
pipeline hands to the measurements (:mod:`mmalign.demo.results`) and the report.

Example:
    >>> Run.__dataclass_fields__["reused"].default
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mmalign.config import Config, ConfigError
from mmalign.data.sources import resolve_sources
from mmalign.model import AlignmentModel

T = TypeVar("T")


@dataclass
class Run:
    """A trained demo model with its run directory, config and training figures."""

    name: str
    directory: Path
    config_file: str
    """Name of the config in the configs directory (``demo_digits.yaml``...)."""
    config: Config
    steps: int
    final_loss: float | None
    model: AlignmentModel
    reused: bool = False
    """Trained by an earlier ``mmalign demo`` (``--reuse``): nothing was trained now."""

    @property
    def train_shards(self) -> Sequence[str]:
        """The config's ``data.train``."""
        _named(self.config.data.train, f"{self.config_file}: data.train")
        assert self.config.data.train is not None
        sources = resolve_sources(self.config.data.train)
        return [url for source in sources for url in source.urls]

    @property
    def test_shards(self) -> Sequence[str]:
        """The config's ``data.test`` (every demo config names a test split)."""
        return _named(self.config.data.test, f"{self.config_file}: data.test")

    @property
    def classes(self) -> str:
        """The config's ``data.classes`` (class names and prompts, ``classes.json``)."""
        return _named(self.config.data.classes, f"{self.config_file}: data.classes")


def _named(value: T | None, field: str) -> T:
    if value is None:
        raise ConfigError(f"{field} is missing; the demo's measurements need it")
    return value
