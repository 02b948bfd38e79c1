"""Truncated embeddings: encode, export, index, search and zero-shot use exactly the first
``dim`` coordinates, renormalized; a dim that is not a trained prefix is warned about."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest
import torch

from mmalign.cli.export import add_arguments as add_export_arguments
from mmalign.cli.export import run as export_command
from mmalign.data.exports import load_embeddings
from mmalign.eval.report import run_eval
from mmalign.eval.retrieval import retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier
from mmalign.export import build_index, export_embeddings, load_index, search
from mmalign.model import AlignmentModel
from tests.eval.test_zeroshot import TEXT, tabular
from tests.export.test_writer import FIELDS, ROWS, export_options, make_data


def _prefix(vectors: torch.Tensor | np.ndarray, dim: int) -> np.ndarray:
    """The renormalized prefix, in float64, written out."""
    head = np.asarray(vectors, dtype=np.float64)[:, :dim]
    return head / np.sqrt((head**2).sum(axis=1, keepdims=True))


@pytest.fixture
def model() -> AlignmentModel:
    torch.manual_seed(0)
    towers = {"x": tabular(3), "y": tabular(3), "text": TEXT}
    config = {"dim": 8, "matryoshka": [4, 8], "objective": {"name": "clip"}, "towers": towers}
    return AlignmentModel.from_config(config).eval()


def test_encode_keeps_the_renormalized_prefix_and_warns_off_prefix(model) -> None:
    raws = [[0.1, 0.5, -1.0], [2.0, 0.0, 1.0], [0.3, 0.3, 0.3]]
    full = model.encode("x", raws)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained prefix: no warning
        four = model.encode("x", raws, dim=4)
    np.testing.assert_allclose(four.numpy(), _prefix(full, 4), rtol=1e-6, atol=1e-7)
    assert not np.allclose(four.numpy(), full[:, :4].numpy())  # it really was renormalized
    with pytest.warns(UserWarning, match=r"dim 3 is not a trained Matryoshka prefix \(trained"):
        three = model.encode("x", raws, dim=3)
    np.testing.assert_allclose(three.numpy(), _prefix(full, 3), rtol=1e-6, atol=1e-7)
    for bad in (0, 9):
        with pytest.raises(ValueError, match=rf"dim {bad} is outside 1\.\.8, the model's dim"):
            model.encode("x", raws, dim=bad)


def test_export_dim_writes_the_prefix_and_search_scores_it(tmp_path, model) -> None:
    shards, raw = make_data(tmp_path)
    saved = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    manifest = export_embeddings(saved, shards, ["x", "y", "text"], out, **export_options(dim=4))
    assert manifest["settings"]["dim"] == 4 and manifest["settings"]["matryoshka"] == [4, 8]
    x, _ = load_embeddings(out, "x")
    np.testing.assert_allclose(x, _prefix(model.encode("x", raw["x"]), 4), atol=1e-6)
    y, table = load_embeddings(out, "y")
    has_y = np.asarray(table.column("present_y").to_pylist())
    assert y.shape == (ROWS, 4) and np.isnan(y[~has_y]).all() and not np.isnan(y[has_y]).any()

    build_index(out, "x", "flat")
    query = raw["text"][5]
    rows = search(out, None, query, "text", k=ROWS, target="x")
    query_prefix = _prefix(model.encode("text", [query]), 4)
    brute = (query_prefix @ x.T)[0]
    assert [row["key"] for row in rows] == [f"k{i:04d}" for i in np.argsort(-brute, kind="stable")]
    np.testing.assert_allclose([row["score"] for row in rows], np.sort(brute)[::-1], atol=1e-5)

    # the same prefix indexed from a full-size export
    full_out = tmp_path / "full"
    export_embeddings(saved, shards, ["x"], full_out, **export_options())
    build_index(full_out, "x", "flat", dim=4)
    assert load_index(full_out, "x").info["dim"] == 4
    again = search(full_out, None, query, "text", k=ROWS, target="x")
    assert [row["key"] for row in again] == [row["key"] for row in rows]
    with pytest.warns(UserWarning, match="dim 2 is not a trained"):
        build_index(full_out, "x", "flat", dim=2)


def test_cli_export_dim_and_index_kind(tmp_path, model, capsys) -> None:
    make_data(tmp_path)
    saved = model.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "emb"
    fields = [f"--field={name}={ext}" for name, ext in FIELDS.items()]
    options = ["--dim", "4", "--modalities", "x", "--index", "sq8", "--no-progress", *fields]
    args = parser.parse_args(
        [str(saved), "--data", str(tmp_path / "data"), "--out", str(out), *options]
    )
    assert export_command(args) == 0
    info = json.loads((out / "index" / "x.json").read_text())
    assert (info["kind"], info["dim"], info["rows"]) == ("sq8", 4, ROWS)
    assert info["bytes"] == (out / "index" / "x.faiss").stat().st_size
    printed = capsys.readouterr().out
    assert f"(sq8, {ROWS} x 4, {info['bytes']:,} bytes" in printed


def test_zeroshot_classifier_dim_uses_the_prefix(model) -> None:
    prompts = [["a one", "one"], ["a two"], ["three", "a three", "the three"]]
    classifier = ZeroShotClassifier(model, prompts, "text", dim=4)
    class_vectors = []
    for group in prompts:
        mean = _prefix(model.encode("text", group), 4).mean(axis=0)
        class_vectors.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(classifier.class_embeddings, np.stack(class_vectors), atol=1e-6)
    queries = [[0.1, 0.5, -1.0], [2.0, 0.0, 1.0]]
    scores = classifier.scores({"x": queries})
    expected = _prefix(model.encode("x", queries), 4) @ np.stack(class_vectors).T
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)
    # already-encoded full-size queries are cut to the classifier's dim the same way
    from_full = classifier.scores_from_embeddings({"x": model.encode("x", queries)})
    np.testing.assert_allclose(from_full.numpy(), expected, atol=1e-6)


def test_eval_report_has_retrieval_at_each_trained_prefix(tmp_path, model) -> None:
    shards, raw = make_data(tmp_path)
    report = run_eval(model, shards, tmp_path / "eval", modalities=["x", "text"], fields=FIELDS)
    metrics = report["metrics"]
    assert "dim8/instance/R@1/x->text" not in metrics  # full size: the plain keys
    x = torch.from_numpy(_prefix(model.encode("x", raw["x"]), 4))
    text = torch.from_numpy(_prefix(model.encode("text", raw["text"]), 4))
    expected = retrieval_metrics(x, text, list(range(ROWS)), list(range(ROWS)), ks=(1, 5))
    assert metrics["dim4/instance/R@1/x->text"] == pytest.approx(expected["q2g/R@1"])
    assert metrics["dim4/instance/R@5/text->x"] == pytest.approx(expected["g2q/R@5"])
