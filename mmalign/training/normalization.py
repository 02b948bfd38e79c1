"""Statistics fitted from training data before the first step (``normalize: fit``).

A tower asks for it in its config (``normalize: fit``, ``normalize_records: N``, e.g. the
tabular tower) and implements ``fit_normalization(vectors)``. The statistics are buffers of
the tower, so checkpoints and the saved model keep them, and evaluation and export apply
them. Every process reads the same first N records of ``data.train`` in shard order (no
shuffling, resampling or augmentation), so all ranks fit the same statistics.

Example:
    >>> fitted = fit_normalizers(model, config.data)  # doctest: +SKIP
    >>> fitted  # doctest: +SKIP
    {'labs': 1000}
"""

from __future__ import annotations

from typing import Protocol, cast

import numpy as np

from mmalign.config import ConfigError, DataConfig
from mmalign.data import make_loader
from mmalign.model import AlignmentModel


class NormalizationSettings(Protocol):
    """The config fields of a tower that fits statistics (the tabular tower's)."""

    @property
    def normalize(self) -> str: ...

    @property
    def normalize_records(self) -> int: ...


class NormalizingTower(Protocol):
    """A tower whose config says ``normalize: fit``: it fits its statistics from vectors."""

    @property
    def config(self) -> NormalizationSettings: ...

    def fit_normalization(self, vectors: np.ndarray) -> None: ...


def towers_to_fit(model: AlignmentModel) -> dict[str, NormalizingTower]:
    """The towers whose config says ``normalize: fit``, by modality."""
    return {
        name: cast(NormalizingTower, tower)  # the contract of the module doc
        for name, tower in model.towers.items()
        if getattr(tower.config, "normalize", "none") == "fit"
    }


def training_samples(
    model: AlignmentModel, data: DataConfig, modality: str, count: int
) -> np.ndarray:
    """The first ``count`` preprocessed samples of ``modality`` in ``data.train``, stacked."""
    tower = model.towers[modality]
    assert data.train is not None, "check_run_config: training needs data.train"
    loader = make_loader(
        data.train,
        {modality: tower},
        data.fields,
        data.batch_size,
        rank=0,
        world_size=1,
        field="data.train",
    )
    rows: list[np.ndarray] = []
    for batch in loader:
        if batch.inputs[modality] is not None:
            rows.extend(batch.inputs[modality].numpy())
        if len(rows) >= count:
            break
    return np.stack(rows[:count]) if rows else np.zeros((0, 0))


def fit_normalizers(model: AlignmentModel, data: DataConfig) -> dict[str, int]:
    """Fit the statistics of every ``normalize: fit`` tower; modality -> records used."""
    fitted = {}
    for modality, tower in towers_to_fit(model).items():
        samples = training_samples(model, data, modality, tower.config.normalize_records)
        if len(samples) == 0:
            raise ConfigError(
                f"model.towers.{modality}.normalize: no training record of data.train has "
                f"'{modality}' ({data.fields.get(modality)}); nothing to fit the statistics "
                "on; check data.fields"
            )
        tower.fit_normalization(samples)
        fitted[modality] = len(samples)
    return fitted
