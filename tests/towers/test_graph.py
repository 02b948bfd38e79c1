"""Graph tower: PyG encoders and pools, batch independence, GraphCL augmentation counts,
validation errors, and the tower inside an AlignmentModel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch_geometric.data import Data

from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower

BASE = {"type": "graph", "in_features": 2, "hidden": 16, "layers": 2}


def ring(nodes: int, features: int = 2, chords: int = 0) -> dict:
    """A cycle (both edge directions) plus ``chords`` random extra edges; ``x[:, 0]`` holds
    ``node id + 1`` so tests can recover which original node a row came from."""
    rng = np.random.default_rng(nodes)
    pairs = [(i, (i + 1) % nodes) for i in range(nodes)]
    pairs += [tuple(rng.choice(nodes, size=2, replace=False)) for _ in range(chords)]
    pairs = sorted({(min(a, b), max(a, b)) for a, b in pairs})
    edge_index = np.array(pairs + [(b, a) for a, b in pairs]).T
    x = rng.normal(size=(nodes, features)).astype(np.float32)
    x[:, 0] = np.arange(nodes) + 1
    return {
        "x": x,
        "edge_index": edge_index,
        "edge_attr": rng.normal(size=(edge_index.shape[1], 3)),
    }


def original_ids(data: Data) -> list[int]:
    return [int(value) - 1 for value in data.x[:, 0].tolist()]


def edge_set(edge_index: torch.Tensor, ids: list[int] | None = None) -> set[tuple[int, int]]:
    pairs = edge_index.t().tolist()
    return {(ids[a], ids[b]) if ids else (a, b) for a, b in pairs}


@pytest.mark.parametrize(
    "config",
    [
        {"encoder": "gin", "pooling": "mean"},
        {"encoder": "gin", "pooling": "attention", "norm": "layer_norm"},
        {"encoder": "gcn", "pooling": "add"},
        {"encoder": "gat", "pooling": "max", "heads": 2},
        {"encoder": "gin", "edge_features": 3, "pooling": "mean"},
        {"encoder": "gat", "edge_features": 3, "pooling": "attention"},
    ],
    ids=lambda config: "-".join(str(value) for value in config.values()),
)
def test_encoders_shape_and_batch_independence(config: dict) -> None:
    tower = build_tower({**BASE, **config}).eval()
    graphs = [ring(n, chords=n // 2) for n in (3, 7, 5, 12)]
    items = [tower.preprocess(graph) for graph in graphs]
    with torch.no_grad():
        batch = tower(tower.collate(items))
        alone = torch.cat([tower(tower.collate([item])) for item in items])
        reordered = tower(tower.collate([items[3], items[1]]))
    assert tower.collate(items).num_graphs == 4
    assert batch.shape == (4, 16) and tower.width == 16
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered, batch[[3, 1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [{"encoder": "gin", "edge_features": 3}, {"encoder": "gat", "edge_features": 3, "heads": 2}],
)
def test_edge_features_are_used(config: dict) -> None:
    tower = build_tower({**BASE, **config}).eval()
    graph = ring(6, chords=2)
    changed = {**graph, "edge_attr": graph["edge_attr"] + 1.0}
    with torch.no_grad():
        before = tower(tower.collate([tower.preprocess(graph)]))
        after = tower(tower.collate([tower.preprocess(changed)]))
    assert (before - after).abs().max() > 1e-4


def test_gcn_reads_one_edge_feature_as_edge_weight() -> None:
    tower = build_tower({**BASE, "encoder": "gcn", "edge_features": 1, "norm": "none"}).eval()
    graph = ring(5)
    edges = graph["edge_index"].shape[1]
    unweighted = {**graph, "edge_attr": np.ones(edges)}
    weighted = {**graph, "edge_attr": np.linspace(0.5, 2.0, edges)}
    with torch.no_grad():
        plain = tower.gnn(torch.as_tensor(graph["x"]), torch.as_tensor(graph["edge_index"]))
        ones = tower(tower.collate([tower.preprocess(unweighted)]))
        other = tower(tower.collate([tower.preprocess(weighted)]))
    torch.testing.assert_close(ones[0], plain.mean(0))
    assert (ones - other).abs().max() > 1e-4


def test_pools_agree_with_their_definitions() -> None:
    towers = {}
    for pooling in ("mean", "add", "max"):
        torch.manual_seed(3)  # same GNN weights for each pooling
        towers[pooling] = build_tower({**BASE, "pooling": pooling}).eval()
    graphs = [ring(4), ring(9)]
    with torch.no_grad():
        out = {name: t(t.collate([t.preprocess(g) for g in graphs])) for name, t in towers.items()}
        nodes = towers["mean"].gnn(
            torch.as_tensor(graphs[1]["x"]), torch.as_tensor(graphs[1]["edge_index"])
        )
    torch.testing.assert_close(out["add"], out["mean"] * torch.tensor([[4.0], [9.0]]))
    torch.testing.assert_close(out["max"][1], nodes.max(0).values)


@pytest.mark.parametrize(("nodes", "ratio"), [(10, 0.2), (7, 0.3), (13, 0.5), (2, 0.9)])
def test_node_drop_removes_floor_ratio_nodes_and_their_edges(nodes: int, ratio: float) -> None:
    tower = build_tower({**BASE, "edge_features": 3, "augment_node_drop": ratio})
    graph = ring(nodes, chords=nodes)
    data = tower.preprocess(graph, augment=True)
    ids = original_ids(data)
    assert data.num_nodes == nodes - int(np.floor(ratio * nodes)) == len(set(ids))
    original = edge_set(torch.as_tensor(graph["edge_index"]))
    induced = {(a, b) for a, b in original if a in ids and b in ids}
    assert edge_set(data.edge_index, ids) == induced
    assert data.edge_attr.shape == (len(induced), 3)


@pytest.mark.parametrize(("nodes", "ratio"), [(10, 0.2), (9, 0.5), (20, 0.75)])
def test_subgraph_keeps_a_connected_random_walk_subgraph(nodes: int, ratio: float) -> None:
    tower = build_tower({**BASE, "augment_subgraph": ratio})
    graph = ring(nodes, chords=2)
    seen = set()
    for _ in range(5):
        data = tower.preprocess(graph, augment=True)
        ids = original_ids(data)
        seen.add(tuple(sorted(ids)))
        assert data.num_nodes == nodes - int(np.floor(ratio * nodes))
        original = edge_set(torch.as_tensor(graph["edge_index"]))
        assert edge_set(data.edge_index, ids) == {(a, b) for a, b in original if {a, b} <= set(ids)}
        rows, cols = data.edge_index.numpy()
        adjacency = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(data.num_nodes,) * 2)
        assert connected_components(adjacency, directed=False)[0] == 1
    assert len(seen) > 1  # random per call


@pytest.mark.parametrize(("chords", "ratio"), [(0, 0.2), (5, 0.5), (10, 1.0)])
def test_edge_perturbation_replaces_floor_ratio_edges(chords: int, ratio: float) -> None:
    tower = build_tower({**BASE, "edge_features": 3, "augment_edge_perturb": ratio})
    graph = ring(16, chords=chords)
    edges = graph["edge_index"].shape[1]
    removed = int(np.floor(ratio * edges))
    data = tower.preprocess(graph, augment=True)
    original = edge_set(torch.as_tensor(graph["edge_index"]))
    result = data.edge_index.t().tolist()
    kept = [i for i, pair in enumerate(result) if tuple(pair) in original]
    added = [i for i, pair in enumerate(result) if tuple(pair) not in original]
    assert len(kept) == edges - removed
    assert 0 < len(added) <= removed and len(added) >= removed // 2
    assert all(a != b for a, b in (result[i] for i in added))  # no self-loops added
    assert data.num_nodes == 16 and torch.equal(data.x, torch.as_tensor(graph["x"]))
    assert not data.edge_attr[added].any()
    attr_of = {
        tuple(pair): row for pair, row in zip(graph["edge_index"].T.tolist(), graph["edge_attr"])
    }
    for i in kept:
        np.testing.assert_allclose(data.edge_attr[i].numpy(), attr_of[tuple(result[i])], rtol=1e-6)


@pytest.mark.parametrize(("nodes", "ratio"), [(10, 0.2), (7, 0.5), (5, 1.0)])
def test_attribute_masking_zeroes_floor_ratio_rows(nodes: int, ratio: float) -> None:
    tower = build_tower({**BASE, "augment_attr_mask": ratio})
    graph = ring(nodes)
    data = tower.preprocess(graph, augment=True)
    x = torch.as_tensor(graph["x"])
    zeroed = (data.x == 0).all(1)
    assert int(zeroed.sum()) == int(np.floor(ratio * nodes))
    torch.testing.assert_close(data.x[~zeroed], x[~zeroed])
    assert torch.equal(data.edge_index, torch.as_tensor(graph["edge_index"]))


def test_no_augmentation_at_eval_and_one_at_a_time_when_picking() -> None:
    ratios = {"augment_subgraph": 0.5, "augment_node_drop": 0.25}
    ratios |= {"augment_edge_perturb": 0.5, "augment_attr_mask": 0.5}
    graph = ring(12, chords=4)
    tower = build_tower({**BASE, **ratios})
    for _ in range(3):
        data = tower.preprocess(graph)  # augment is off by default
        assert torch.equal(data.x, torch.as_tensor(graph["x"]))
        assert torch.equal(data.edge_index, torch.as_tensor(graph["edge_index"]))
    both = tower.preprocess(graph, augment=True)
    assert both.num_nodes == 6 - int(np.floor(0.25 * 6))  # subgraph then node drop
    picking = build_tower({**BASE, **ratios, "augment_pick_one": True})
    node_counts = {picking.preprocess(graph, augment=True).num_nodes for _ in range(40)}
    assert node_counts == {12, 6, 9}  # edge/attribute changes, subgraph, node drop


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"x": np.zeros((0, 2)), "edge_index": np.zeros((2, 0))}, "empty \\(0 nodes\\)"),
        ({"x": [], "edge_index": []}, "empty \\(0 nodes\\)"),
        ({"x": np.ones((3, 2)), "edge_index": [[0, 1], [1, 3]]}, "refers to node 3.*3 nodes"),
        ({"x": np.ones((3, 2)), "edge_index": [[0, -1], [1, 2]]}, "refers to node -1"),
        ({"x": np.ones((3, 2)), "edge_index": [[0, 1, 2]]}, "must be \\[2, E\\]"),
        ({"x": np.ones((3, 2)), "edge_index": [[0.5, 1], [1, 2]]}, "integer node indices"),
        ({"x": np.ones((3, 5)), "edge_index": [[0], [1]]}, "\\[N, 2\\] \\(in_features\\).*3, 5"),
        ({"x": [[1.0, np.nan], [0, 0]], "edge_index": [[0], [1]]}, "NaN or Inf node features"),
        ({"x": [["a", "b"]], "edge_index": [[0], [0]]}, "'x' must be a numeric array"),
        ({"edge_index": [[0], [1]]}, "must be a dict with 'x'"),
        ([1, 2, 3], "must be a dict with 'x'"),
    ],
)
def test_bad_graphs_give_clear_errors(graph: object, message: str) -> None:
    tower = build_tower(BASE, field="model.towers.graph")
    with pytest.raises(ValueError, match=message):
        tower.preprocess(graph)


def test_edge_attribute_errors() -> None:
    tower = build_tower({**BASE, "edge_features": 3})
    graph = ring(4)
    with pytest.raises(ValueError, match="needs 'edge_attr' \\[E, 3\\]"):
        tower.preprocess({"x": graph["x"], "edge_index": graph["edge_index"]})
    with pytest.raises(ValueError, match="'edge_attr' must be \\[8, 3\\]"):
        tower.preprocess({**graph, "edge_attr": np.ones((8, 2))})
    with pytest.raises(ValueError, match="'edge_attr' contains NaN"):
        tower.preprocess({**graph, "edge_attr": np.full((8, 3), np.nan)})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"encoder": "gat", "hidden": 10, "heads": 4}, "hidden 10 must be divisible by heads 4"),
        ({"encoder": "gcn", "edge_features": 3}, "set edge_features to 1"),
        ({"encoder": "sage"}, "model.towers.graph.encoder"),
        ({"augment_node_drop": 1.0}, "augment_node_drop"),
        ({"in_features": None}, "model.towers.graph.in_features"),
    ],
)
def test_bad_config_gives_clear_errors(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_tower({**BASE, **config}, field="model.towers.graph")


def test_accepts_pyg_data_and_model_round_trip(tmp_path: Path) -> None:
    model = AlignmentModel.from_config(
        {"dim": 8, "towers": {"graph": {**BASE, "pooling": "attention"}}}
    )
    graphs = [ring(n, chords=1) for n in (3, 5, 8)]
    graphs[1] = Data(
        x=torch.as_tensor(graphs[1]["x"]), edge_index=torch.as_tensor(graphs[1]["edge_index"])
    )
    embeddings = model.encode("graph", graphs, batch_size=2)
    assert embeddings.shape == (3, 8)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    loaded = AlignmentModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    torch.testing.assert_close(loaded.encode("graph", graphs), embeddings, atol=1e-6, rtol=1e-6)
