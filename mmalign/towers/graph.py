"""The graph tower (``type: graph``): PyG GNN encoders with a global pooling.

A raw sample is a dict with ``x`` (``[N, in_features]`` node features), ``edge_index``
(``[2, E]`` integer node indices) and, when ``edge_features`` is set, ``edge_attr``
(``[E, edge_features]``; other edge attributes are ignored). ``preprocess`` validates it into a
``torch_geometric.data.Data``; ``collate`` is ``Batch.from_data_list``.

Encoders are torch_geometric's ``GIN`` (``GINEConv`` layers when ``edge_features`` is set),
``GCN`` (``edge_features: 1`` is used as edge weights) and ``GAT`` (``edge_dim``), pooled by
``global_mean_pool`` / ``global_add_pool`` / ``global_max_pool`` or ``AttentionalAggregation``.

GraphCL augmentations (train time only, in ``preprocess(raw, augment=True)``; torch's
global RNG, so seeded DataLoader workers differ). With ``N`` nodes, ``E`` edges (directed
entries of ``edge_index``) and ratio ``r``, counts use ``floor``:

- ``augment_subgraph: r``: keep ``N - floor(r N)`` nodes grown from a random node by adding
  random neighbours of the kept set (a random unvisited node when the component runs out);
  the induced subgraph.
- ``augment_node_drop: r``: drop ``floor(r N)`` random nodes and their edges.
- ``augment_edge_perturb: r``: remove ``floor(r E)`` random edges and add as many new node
  pairs, sampled among non-edges by PyG's ``negative_sampling`` (which may return fewer when
  the graph is nearly complete); added edges get zero ``edge_attr``.
- ``augment_attr_mask: r``: set the features of ``floor(r N)`` random nodes to 0.

At least one node is always kept. Enabled augmentations apply in the order above, or, with
``augment_pick_one``, one of them chosen uniformly per call (GraphCL's random mode).

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "graph", "in_features": 2, "hidden": 16})
    >>> graph = {"x": [[0.0, 1.0], [1.0, 0.0]], "edge_index": [[0, 1], [1, 0]]}
    >>> tower.eval()(tower.collate([tower.preprocess(graph)])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from mmalign.errors import SampleError
from mmalign.extras import missing_extra
from mmalign.towers.base import Tower, register_tower, running_batch_norm
from mmalign.towers.options.graph import GraphTowerConfig

# torch_geometric scripts its pooling selectors with `torch.jit.script` at import, which
# torch >= 2.9 answers with a FutureWarning on every import: not the user's to act on.
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        from torch_geometric.data import Batch, Data
        from torch_geometric.nn import (
            AttentionalAggregation,
            GINEConv,
            global_add_pool,
            global_max_pool,
            global_mean_pool,
        )
        from torch_geometric.nn.models import GAT, GCN, GIN, MLP
        from torch_geometric.nn.models.basic_gnn import BasicGNN
        from torch_geometric.utils import negative_sampling, subgraph
except ImportError:
    raise missing_extra("graph", "the graph tower (type: graph)") from None

_POOLS = {"mean": global_mean_pool, "add": global_add_pool, "max": global_max_pool}


class GINE(BasicGNN):
    """torch_geometric's ``GIN`` with ``GINEConv`` layers, which also read edge features."""

    supports_edge_weight: Final[bool] = False
    supports_edge_attr: Final[bool] = True
    supports_norm_batch: Final[bool]  # type: ignore[misc]  # set by BasicGNN.__init__

    def init_conv(self, in_channels: int, out_channels: int, **kwargs: Any) -> GINEConv:
        mlp = MLP(
            [in_channels, out_channels, out_channels],
            act=self.act,
            act_first=self.act_first,
            norm=self.norm,
            norm_kwargs=self.norm_kwargs,
        )
        return GINEConv(mlp, **kwargs)


def _build_gnn(config: GraphTowerConfig) -> BasicGNN:
    common: dict[str, Any] = {
        "in_channels": config.in_features,
        "hidden_channels": config.hidden,
        "num_layers": config.layers,
        "dropout": config.dropout,
        "norm": None if config.norm == "none" else config.norm,
        # Per node: PyG's default "graph" mode would mix the nodes of all graphs in a batch.
        "norm_kwargs": {"mode": "node"} if config.norm == "layer_norm" else None,
    }
    if config.encoder == "gcn":
        return GCN(**common)
    if config.encoder == "gat":
        return GAT(**common, heads=config.heads, edge_dim=config.edge_features)
    if config.edge_features is not None:
        return GINE(**common, edge_dim=config.edge_features)
    return GIN(**common)


def _count(ratio: float, total: int) -> int:
    return int(np.floor(ratio * total))


def _induced(data: Data, keep: torch.Tensor) -> Data:
    """The subgraph induced by the node indices ``keep`` (relabelled 0..len(keep)-1)."""
    keep = keep.sort().values
    edge_index, edge_attr = subgraph(
        keep, data.edge_index, data.edge_attr, relabel_nodes=True, num_nodes=data.num_nodes
    )
    return Data(x=data.x[keep], edge_index=edge_index, edge_attr=edge_attr)


def drop_nodes(data: Data, ratio: float) -> Data:
    """Remove ``floor(ratio * N)`` random nodes (at most ``N - 1``) and their edges."""
    drop = min(_count(ratio, data.num_nodes), data.num_nodes - 1)
    return _induced(data, torch.randperm(data.num_nodes)[drop:])


def random_walk_subgraph(data: Data, ratio: float) -> Data:
    """Keep ``N - floor(ratio * N)`` nodes grown from a random start through random
    neighbours of the kept set (jumping to a random unvisited node when none is left)."""
    size = max(data.num_nodes - _count(ratio, data.num_nodes), 1)
    neighbours: list[set[int]] = [set() for _ in range(data.num_nodes)]
    for source, target in data.edge_index.t().tolist():
        neighbours[source].add(target)
        neighbours[target].add(source)
    kept = {int(torch.randint(data.num_nodes, ()))}
    frontier = set(neighbours[next(iter(kept))])
    while len(kept) < size:
        pool = sorted(frontier - kept) or sorted(set(range(data.num_nodes)) - kept)
        node = pool[int(torch.randint(len(pool), ()))]
        kept.add(node)
        frontier |= neighbours[node]
    return _induced(data, torch.tensor(sorted(kept)))


def perturb_edges(data: Data, ratio: float) -> Data:
    """Remove ``floor(ratio * E)`` random edges and add up to as many non-edges."""
    count = _count(ratio, data.num_edges)
    if count == 0:
        return data
    keep = torch.randperm(data.num_edges)[count:].sort().values
    added = negative_sampling(data.edge_index, num_nodes=data.num_nodes, num_neg_samples=count)
    edge_index = torch.cat([data.edge_index[:, keep], added], dim=1)
    edge_attr = data.edge_attr
    if edge_attr is not None:
        padding = edge_attr.new_zeros(added.shape[1], edge_attr.shape[1])
        edge_attr = torch.cat([edge_attr[keep], padding])
    return Data(x=data.x, edge_index=edge_index, edge_attr=edge_attr)


def mask_attributes(data: Data, ratio: float) -> Data:
    """Set the features of ``floor(ratio * N)`` random nodes to zero."""
    x = data.x.clone()
    x[torch.randperm(data.num_nodes)[: _count(ratio, data.num_nodes)]] = 0.0
    return Data(x=x, edge_index=data.edge_index, edge_attr=data.edge_attr)


def _tensor(value: Any, dtype: torch.dtype, name: str, where: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value), dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where}: '{name}' must be a numeric array: {error}") from None


@register_tower("graph")
class GraphTower(Tower):
    """GNN tower over PyG graphs (see the module docstring).

    Example:
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "graph", "in_features": 1, "encoder": "gcn"})
        >>> data = tower.preprocess({"x": [[1.0], [2.0], [3.0]], "edge_index": [[0, 1], [1, 2]]})
        >>> data.num_nodes, data.num_edges
        (3, 2)
    """

    config_class = GraphTowerConfig
    config: GraphTowerConfig

    def __init__(
        self, config: GraphTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        self.gnn = _build_gnn(config)
        self.attention_pool = (
            AttentionalAggregation(gate_nn=nn.Linear(config.hidden, 1))
            if config.pooling == "attention"
            else None
        )
        self.width = config.hidden

    def preprocess(self, raw: Any, augment: bool = False) -> Data:
        """Validate a graph dict (or ``Data``); ``augment``: apply the enabled augmentations."""
        data = self._validate(raw)
        if augment:
            for augmentation, ratio in self._augmentations():
                data = augmentation(data, ratio)
        return data

    def enable_gradient_checkpointing(self) -> bool:
        """Not done: a GNN keeps small activations, and recomputing would update its
        BatchNorm statistics a second time."""
        return False

    def _augmentations(self) -> list[tuple[Any, float]]:
        config = self.config
        enabled = [
            (augmentation, ratio)
            for augmentation, ratio in (
                (random_walk_subgraph, config.augment_subgraph),
                (drop_nodes, config.augment_node_drop),
                (perturb_edges, config.augment_edge_perturb),
                (mask_attributes, config.augment_attr_mask),
            )
            if ratio > 0
        ]
        if config.augment_pick_one and enabled:
            return [enabled[int(torch.randint(len(enabled), ()))]]
        return enabled

    def _validate(self, raw: Any) -> Data:
        where = f"{self.field}: graph sample"
        if not isinstance(raw, Mapping | Data) or "x" not in raw or "edge_index" not in raw:
            raise ValueError(
                f"{where} must be a dict with 'x' [N, F] and 'edge_index' [2, E], "
                f"got {type(raw).__name__}"
            )
        x = _tensor(raw["x"], torch.float32, "x", where)
        edge_index = _tensor(raw["edge_index"], torch.float64, "edge_index", where)
        features = self.config.in_features
        if x.ndim >= 1 and x.shape[0] == 0:
            raise ValueError(f"{where}: the graph is empty (0 nodes)")
        if x.ndim != 2 or x.shape[1] != features:
            raise ValueError(
                f"{where}: 'x' must be [N, {features}] (in_features), got shape {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise SampleError("nonfinite", f"{where}: 'x' contains NaN or Inf node features")
        edge_index = self._validate_edges(edge_index, x.shape[0], where)
        edge_attr = self._validate_edge_attr(raw, edge_index.shape[1], where)
        return Data(x=x, edge_index=edge_index, edge_attr=edge_attr)

    @staticmethod
    def _validate_edges(edge_index: torch.Tensor, num_nodes: int, where: str) -> torch.Tensor:
        if edge_index.numel() == 0:
            return torch.zeros(2, 0, dtype=torch.long)
        if edge_index.ndim != 2 or edge_index.shape[0] != 2:
            raise ValueError(
                f"{where}: 'edge_index' must be [2, E], got shape {tuple(edge_index.shape)}"
            )
        if not torch.equal(edge_index, edge_index.round()):
            raise ValueError(f"{where}: 'edge_index' must hold integer node indices")
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(
                f"{where}: 'edge_index' refers to node {low if low < 0 else high}, out of range "
                f"for a graph with {num_nodes} nodes (valid: 0..{num_nodes - 1})"
            )
        return edge_index.long()

    def _validate_edge_attr(self, raw: Any, num_edges: int, where: str) -> torch.Tensor | None:
        width = self.config.edge_features
        if width is None:
            return None
        if "edge_attr" not in raw or raw["edge_attr"] is None:
            raise ValueError(f"{where}: needs 'edge_attr' [E, {width}] (edge_features is set)")
        edge_attr = _tensor(raw["edge_attr"], torch.float32, "edge_attr", where)
        if edge_attr.ndim == 1 and width == 1:
            edge_attr = edge_attr[:, None]
        if tuple(edge_attr.shape) != (num_edges, width):
            raise ValueError(
                f"{where}: 'edge_attr' must be [{num_edges}, {width}] (E, edge_features), "
                f"got shape {tuple(edge_attr.shape)}"
            )
        if not torch.isfinite(edge_attr).all():
            raise SampleError("nonfinite", f"{where}: 'edge_attr' contains NaN or Inf")
        return edge_attr

    def collate(self, items: Sequence[Data]) -> Batch:
        return Batch.from_data_list(list(items))

    def batch_size_of(self, inputs: Batch) -> int:
        return int(inputs.num_graphs)

    def forward(self, inputs: Batch) -> torch.Tensor:
        edge_attr = inputs.edge_attr if self.config.edge_features is not None else None
        with running_batch_norm(self.gnn, when=inputs.num_nodes <= 1):
            if self.config.encoder == "gcn":
                weight = edge_attr.view(-1) if edge_attr is not None else None
                nodes = self.gnn(
                    inputs.x, inputs.edge_index, edge_weight=weight, batch=inputs.batch
                )
            else:
                nodes = self.gnn(
                    inputs.x, inputs.edge_index, edge_attr=edge_attr, batch=inputs.batch
                )
        if self.attention_pool is not None:
            return self.attention_pool(nodes, inputs.batch, dim_size=inputs.num_graphs)
        return _POOLS[self.config.pooling](nodes, inputs.batch, size=inputs.num_graphs)
