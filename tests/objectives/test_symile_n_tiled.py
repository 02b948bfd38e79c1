"""Symile ``negatives: n`` in tiles (``model.objective.tile``) equals the dense path and the
``symile`` package in value and gradients: batches that are not a multiple of the tile,
presence masks, groups with every ``positives`` mode (two gloo processes:
test_symile_n_tiled_distributed.py)."""

import pytest
import torch
import torch.nn.functional as F
from symile import Symile

from mmalign.objectives import build_objective, symile_n
from tests.objectives.test_positives import HOLES, MODES, TAU_PLUS, _embeddings, _groups, _present
from tests.objectives.test_tiled import _assert_same


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_tiled_n_equals_dense_with_masks_groups_and_every_positives_mode(mode, count):
    names = ["a", "b", "c", "d"][:count]
    emb, groups = _embeddings(names, dim=5, seed=count), _groups(seed=count)
    present = _present(15, count, HOLES if count == 3 else [*HOLES, (5, 3), (6, 3)])
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    config = {"name": "symile", "negatives": "n", "positives": mode, "tau_plus": TAU_PLUS}

    def loss(tile):
        objective = build_objective({**config, "tile": tile})
        generator = torch.Generator().manual_seed(5)
        return objective(emb, scale, present=present, groups=groups, generator=generator).loss

    _assert_same(loss(4), loss("none"), [*emb.values(), scale], rtol=1e-10)


def _float32_triple(rows=37, dim=16):
    generator = torch.Generator().manual_seed(0)
    return {
        name: F.normalize(torch.randn(rows, dim, generator=generator), dim=-1).requires_grad_()
        for name in ("x", "y", "z")
    }


def test_tiled_n_equals_dense_and_the_symile_package_in_float32():
    emb = _float32_triple()
    scale = torch.tensor(20.0, requires_grad=True)
    tensors = [*emb.values(), scale]
    losses = {}
    for name, tile in (("tiled", 8), ("dense", "none")):
        torch.manual_seed(123)  # the permutations: torch's default generator, as the package
        losses[name] = build_objective({"name": "symile", "tile": tile})(emb, scale).loss
    torch.manual_seed(123)
    reference = Symile("n")(list(emb.values()), scale)
    _assert_same(losses["tiled"], reference, tensors, rtol=1e-5)
    _assert_same(losses["tiled"], losses["dense"], tensors, rtol=1e-5)


def test_tiled_n_with_missing_modalities_equals_dense_in_float32():
    emb = _float32_triple()
    present = _present(37, 3, [*HOLES, (20, 1), (36, 2), (36, 0)])
    scale = torch.tensor(20.0, requires_grad=True)

    def loss(tile):
        objective = build_objective({"name": "symile", "tile": tile})
        return objective(emb, scale, present=present, generator=torch.Generator().manual_seed(1))

    tiled, dense = loss(8), loss("none")
    _assert_same(tiled.loss, dense.loss, [*emb.values(), scale], rtol=1e-5)
    assert tiled.metrics.keys() == dense.metrics.keys()


def test_auto_tiles_symile_n_from_2048_rows(monkeypatch):
    calls = []
    kernel = symile_n.pair_logsumexp
    monkeypatch.setattr(
        symile_n, "pair_logsumexp", lambda *args: (calls.append(args[-1]), kernel(*args))[1]
    )
    objective = build_objective({"name": "symile"})
    for rows in (2047, 2048):
        emb = {m: F.normalize(torch.randn(rows, 4), dim=-1) for m in "xyz"}
        objective(emb, torch.tensor(5.0))
    assert calls == [2048] * 3  # one tiled pass per anchor at 2048 rows, none below
