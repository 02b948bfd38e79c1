"""A trained demo model with its run directory, config and training figures: what the
pipeline hands to the measurements (:mod:`mmalign.demo.results`) and the report.

Example:
    >>> Run.__dataclass_fields__["reused"].default
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmalign.config import Config
from mmalign.model import AlignmentModel


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
