"""The projection of a tower's features into the model's shared embedding space.

Example:
    >>> build_projection("linear", 48, 16, "model.towers.text")
    Linear(in_features=48, out_features=16, bias=False)
"""

from __future__ import annotations

from torch import nn

from mmalign.errors import ConfigError


def build_projection(kind: str, width: int, dim: int, field: str) -> nn.Module:
    """The map from a tower's ``width`` to the shared ``dim``: linear, a 2-layer MLP, or none."""
    if kind == "linear":
        return nn.Linear(width, dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
    if width != dim:
        raise ConfigError(
            f"model.projection: 'none' needs every tower's width to equal model.dim ({dim}); "
            f"{field} has width {width}. Use projection 'linear' or set the tower's width"
        )
    return nn.Identity()
