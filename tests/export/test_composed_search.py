"""Composed queries: several query modalities scored against indexed candidates by the
model's objective (Symile: multilinear inner product; pairwise: weighted sum), equal to a
brute-force score computed here."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mmalign.cli.search import add_arguments, run
from mmalign.errors import UserError
from mmalign.export import build_index, export_embeddings, search
from mmalign.export.search import QueryError
from mmalign.model import AlignmentModel
from tests.eval.test_zeroshot import tabular, vectors, write_shards

ROWS = 40


def _model(objective: str) -> AlignmentModel:
    torch.manual_seed(0)
    towers = {"a": tabular(3), "b": tabular(3), "c": tabular(3)}
    return AlignmentModel.from_config(
        {"dim": 8, "objective": {"name": objective}, "towers": towers}
    ).eval()


@pytest.fixture
def candidates(tmp_path) -> tuple[str, list[np.ndarray]]:
    raws = vectors(ROWS, 3, seed=4)
    records = [{"__key__": f"k{i:03d}", "c.npy": raws[i]} for i in range(ROWS)]
    return write_shards(tmp_path / "data" / "c-000000.tar", records), raws


def _index(tmp_path, model, shards, dim=None):
    saved = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "emb"
    options = {"fields": {"c": "c.npy"}, "dtype": "float32", "progress": False, "dim": dim}
    export_embeddings(saved, shards, ["c"], out, **options)
    build_index(out, "c", "flat")
    return out


def _brute(scores: torch.Tensor) -> tuple[list[str], np.ndarray]:
    order = torch.argsort(scores, descending=True, stable=True)
    return [f"k{int(i):03d}" for i in order], scores[order].numpy()


QA, QB = [0.3, -1.2, 0.8], [1.5, 0.2, -0.4]


def test_symile_scores_the_product_of_the_query_embeddings(tmp_path, candidates) -> None:
    model = _model("symile")
    out = _index(tmp_path, model, candidates[0])
    rows = search(out, model, {"a": QA, "b": QB}, k=ROWS)
    a, b = model.encode("a", [QA])[0], model.encode("b", [QB])[0]
    c = model.encode("c", candidates[1])
    keys, scores = _brute(((a * b)[None, :] * c).sum(dim=1))  # sum_d a_d b_d c_d
    assert [row["key"] for row in rows] == keys
    np.testing.assert_allclose([row["score"] for row in rows], scores, atol=1e-6)
    with pytest.raises(QueryError, match="weights apply to pairwise models"):
        search(out, model, {"a": QA, "b": QB}, weights={"a": 2.0})


def test_pairwise_scores_the_weighted_sum_of_similarities(tmp_path, candidates) -> None:
    model = _model("clip")
    out = _index(tmp_path, model, candidates[0])
    a, b = model.encode("a", [QA])[0], model.encode("b", [QB])[0]
    c = model.encode("c", candidates[1])
    for weights, (wa, wb) in [(None, (1.0, 1.0)), ({"a": 2.0, "b": 0.5}, (2.0, 0.5))]:
        rows = search(out, model, {"a": QA, "b": QB}, k=ROWS, weights=weights)
        keys, scores = _brute(wa * (c @ a) + wb * (c @ b))
        assert [row["key"] for row in rows] == keys
        np.testing.assert_allclose([row["score"] for row in rows], scores, atol=1e-6)
    single = search(out, model, QA, "a", k=ROWS)
    assert [row["key"] for row in single] == _brute(c @ a)[0]
    with pytest.raises(QueryError, match="not query modalities"):
        search(out, model, {"a": QA}, weights={"b": 1.0})
    with pytest.raises(QueryError, match="no modality 'z'"):
        search(out, model, {"a": QA, "z": QB})
    with pytest.raises(QueryError, match="or a composed query"):
        search(out, model, QA)


def test_composed_query_on_a_truncated_export_uses_the_prefix(tmp_path, candidates) -> None:
    model = _model("symile")
    with pytest.warns(UserWarning, match="not a trained"):
        out = _index(tmp_path, model, candidates[0], dim=4)
    with pytest.warns(UserWarning, match="dim 4 is not a trained"):
        rows = search(out, model, {"a": QA, "b": QB}, k=ROWS)

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x[:, :4], dim=-1)

    a, b = prefix(model.encode("a", [QA]))[0], prefix(model.encode("b", [QB]))[0]
    c = prefix(model.encode("c", candidates[1]))
    assert [row["key"] for row in rows] == _brute(c @ (a * b))[0]


def test_cli_composes_query_options_with_weights(tmp_path, candidates, capsys) -> None:
    model = _model("clip")
    out = _index(tmp_path, model, candidates[0])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    queries = ["--query", f"a={json.dumps(QA)}", "--query", f"b={json.dumps(QB)}"]
    args = parser.parse_args([str(out), *queries, "--weights", "a=2,b=0.5", "--k", "5", "--json"])
    assert run(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    a, b = model.encode("a", [QA])[0], model.encode("b", [QB])[0]
    c = model.encode("c", candidates[1])
    assert [row["key"] for row in printed] == _brute(2 * (c @ a) + 0.5 * (c @ b))[0][:5]
    args = parser.parse_args([str(out), "--k", "5"])
    with pytest.raises(UserError, match="no query"):
        run(args)
