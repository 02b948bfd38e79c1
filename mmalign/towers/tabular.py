"""The tabular tower (``type: tabular``): fixed-length float vectors to vectors.

A raw sample is a 1-D sequence of ``in_features`` numbers; NaN (or ``None``) marks a missing
entry. ``forward`` standardizes with the ``mean`` / ``std`` buffers (saved with the weights,
so training, evaluation and export apply the same statistics), sets missing entries to 0 and
appends a 0/1 missing indicator per feature, so the MLP (``torchvision.ops.MLP``) sees
``2 * in_features`` inputs. With ``normalize: fit`` in the config, ``mmalign train`` sets the
buffers from the first ``normalize_records`` training records before the first step
(:func:`mmalign.training.normalization.fit_normalizers`); in Python, call
:meth:`TabularTower.fit_normalization` on training vectors.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "tabular", "in_features": 3, "hidden": 16})
    >>> tower(tower.collate([tower.preprocess([1.0, float("nan"), 3.0])])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import MLP

from mmalign.errors import SampleError
from mmalign.towers.base import Tower, register_tower
from mmalign.towers.layout import Block
from mmalign.towers.options.tabular import TabularTowerConfig


def mask_features(vector: torch.Tensor, ratio: float) -> torch.Tensor:
    """``vector`` with ``floor(ratio * n)`` random observed entries set to NaN (missing), at
    least one observed entry kept; random from torch's generator.

    Example:
        >>> int(mask_features(torch.ones(10), 0.3).isnan().sum())
        3
    """
    observed = (~vector.isnan()).nonzero().squeeze(1)
    count = min(int(np.floor(ratio * vector.numel())), observed.numel() - 1)
    masked = vector.clone()
    masked[observed[torch.randperm(observed.numel())[: max(count, 0)]]] = float("nan")
    return masked


def _as_float_array(raw: Any, where: str) -> np.ndarray:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    try:
        array = np.asarray(raw)
    except ValueError:  # ragged nesting, [[1, 2], [3]]
        raise ValueError(f"{where}: must be a flat list of numbers, got a ragged nesting") from None
    if array.dtype.kind == "O":
        try:  # e.g. a list mixing numbers and None (None becomes NaN)
            array = array.astype(np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: entries must be numbers (NaN for missing): {error}"
            ) from None
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{where}: entries must be numbers (NaN for missing), got dtype {array.dtype} "
            f"(e.g. {array.flat[0]!r} if array.size else 'empty')"
        )
    return array.astype(np.float32)


@register_tower("tabular")
class TabularTower(Tower):
    """MLP over standardized float vectors with missing-value indicators.

    Example:
        >>> import numpy as np
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "tabular", "in_features": 2})
        >>> tower.fit_normalization(np.array([[0.0, 1.0], [2.0, np.nan], [4.0, 3.0]]))
        >>> tower.mean.tolist(), tower.std.tolist()
        ([2.0, 2.0], [1.632993221282959, 1.0])
    """

    config_class = TabularTowerConfig
    config: TabularTowerConfig
    mean: torch.Tensor
    std: torch.Tensor
    onnx_input = "features"

    def __init__(
        self, config: TabularTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        self.in_features = config.in_features
        self.width = config.hidden
        self.register_buffer("mean", torch.zeros(config.in_features))
        self.register_buffer("std", torch.ones(config.in_features))
        self.mlp = MLP(
            2 * config.in_features,
            [config.hidden] * config.layers,
            activation_layer=nn.GELU,
            dropout=config.dropout,
        )

    def fit_normalization(self, vectors: Any) -> None:
        """Set ``mean`` / ``std`` from data ``[N, in_features]``, ignoring NaN entries.

        A feature with no observed value keeps mean 0; one with zero spread gets std 1.
        """
        array = _as_float_array(vectors, f"{self.field}: fit_normalization data").astype(np.float64)
        if array.ndim != 2 or array.shape[1] != self.in_features:
            raise ValueError(
                f"{self.field}: fit_normalization needs [N, {self.in_features}] vectors, "
                f"got shape {array.shape}"
            )
        observed = ~np.isnan(array)
        count = observed.sum(0)
        filled = np.where(observed, array, 0.0)
        mean = filled.sum(0) / np.maximum(count, 1)
        variance = (np.where(observed, array - mean, 0.0) ** 2).sum(0) / np.maximum(count, 1)
        std = np.sqrt(variance)
        std[~(std > 1e-8)] = 1.0
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(std))

    def preprocess(self, raw: Any, augment: bool = False) -> torch.Tensor:
        """A 1-D sequence of ``in_features`` numbers (NaN = missing) to a float32 tensor;
        ``augment``: ``augment_feature_mask`` of the features marked missing."""
        where = f"{self.field}: tabular sample"
        vector = _as_float_array(raw, where)
        if vector.ndim != 1 or vector.shape[0] != self.in_features:
            raise ValueError(
                f"{where} must be a 1-D vector of length {self.in_features} "
                f"(in_features), got shape {vector.shape}"
            )
        if np.isinf(vector).any():
            positions = np.flatnonzero(np.isinf(vector)).tolist()
            raise SampleError(
                "nonfinite",
                f"{where} has infinite values at positions {positions}; use NaN for missing",
            )
        if np.isnan(vector).all():
            raise ValueError(f"{where} has no values (every entry is NaN); drop the sample")
        tensor = torch.from_numpy(vector)
        ratio = self.config.augment_feature_mask
        return mask_features(tensor, ratio) if augment and ratio > 0 else tensor

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))

    def blocks(self) -> list[Block]:
        """None: the MLP is not a stack of blocks of one kind (``last_blocks`` is refused)."""
        return []

    def example_raw(self) -> Any:
        """A random row of ``in_features`` numbers."""
        row = np.random.default_rng(0).standard_normal(self.in_features)
        return row.astype(np.float32).tolist()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(inputs)
        standardized = (inputs - self.mean) / self.std
        standardized = standardized.masked_fill(missing, 0.0)
        return self.mlp(torch.cat([standardized, missing.to(standardized.dtype)], dim=-1))
