"""Zero-shot classification and ``run_eval`` on tiny models with answers known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from mmalign.eval import ZeroShotClassifier, nway_retrieval_metrics, run_eval, run_zeroshot
from mmalign.model import AlignmentModel
from mmalign.objectives import build_objective

TEXT = {"type": "text", "width": 16, "heads": 2, "layers": 1, "context_length": 16}


def tabular(features: int) -> dict:
    return {"type": "tabular", "in_features": features, "hidden": 16}


def tiny_model(objective: str, towers: dict, source: AlignmentModel | None = None):
    """A tiny model; with ``source``, the same weights under another objective."""
    model = AlignmentModel.from_config(
        {"dim": 8, "objective": {"name": objective}, "towers": towers}
    ).eval()
    if source is not None:
        model.load_state_dict(source.state_dict())
    return model


def write_shards(path: Path, records: list[dict]) -> str:
    """One WebDataset shard; ``records`` map extensions to values (``__key__`` included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def vectors(rows: int, features: int, seed: int) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [generator.normal(size=features).astype(np.float32) for _ in range(rows)]


def test_mip_and_pairwise_rules_give_different_answers():
    # product = [0.36, -0.64] picks class 1 (MIP); sum = [1.2, 0] picks class 0 (pairwise)
    queries = {"a": torch.tensor([[0.6, 0.8]]), "b": torch.tensor([[0.6, -0.8]])}
    classes = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    symile = build_objective({"name": "symile"}).score(queries, classes)
    pairwise = build_objective({"name": "clip"}).score(queries, classes)
    torch.testing.assert_close(symile, torch.tensor([[0.36, 0.64]]))
    torch.testing.assert_close(pairwise, torch.tensor([[1.2, 0.0]]))
    assert symile.argmax().item() == 1 and pairwise.argmax().item() == 0


def test_classifier_scores_with_the_rule_of_the_model_objective():
    towers = {"x": tabular(3), "y": tabular(3), "z": tabular(2)}
    clip = tiny_model("clip", towers)
    symile = tiny_model("symile", towers, source=clip)
    candidates = [[float(c), -float(c)] for c in range(5)]
    xs, ys = vectors(40, 3, seed=1), vectors(40, 3, seed=2)
    queries = {"x": xs, "y": ys}
    ex, ey, ez = clip.encode("x", xs), clip.encode("y", ys), clip.encode("z", candidates)
    expected = {"symile": (ex * ey) @ ez.T, "clip": (ex + ey) @ ez.T}
    for name, model in (("clip", clip), ("symile", symile)):
        classifier = ZeroShotClassifier(model, candidates, "z")
        torch.testing.assert_close(classifier.scores(queries), expected[name])
        assert torch.equal(classifier.predict(queries), expected[name].argmax(dim=1))
        probabilities = torch.softmax(model.logit_scale_value() * expected[name], dim=1)
        torch.testing.assert_close(classifier.predict_proba(queries), probabilities.detach())
    # the data set is one where the two rules disagree, so the test tells them apart
    assert not torch.equal(expected["symile"].argmax(1), expected["clip"].argmax(1))


def test_templates_are_averaged_then_renormalized():
    model = tiny_model("clip", {"text": TEXT, "x": tabular(2)})
    classnames, templates = ["cat", "dog", "owl"], ["a {}", "the {} here", "{}!"]
    classifier = ZeroShotClassifier.from_texts(model, classnames, templates)
    for index, name in enumerate(classnames):
        prompts = [template.replace("{}", name) for template in templates]
        mean = model.encode("text", prompts).mean(dim=0)
        torch.testing.assert_close(classifier.class_embeddings[index], F.normalize(mean, dim=0))
    assert classifier.classnames == classnames


def test_candidate_lists_average_and_number_lists_are_one_sample():
    model = tiny_model("clip", {"x": tabular(2), "y": tabular(2)})
    several = [[1.0, 2.0], [3.0, -1.0]]
    classifier = ZeroShotClassifier(model, [several, [0.5, 0.5]], "y")
    encoded = model.encode("y", [*several, [0.5, 0.5]])
    torch.testing.assert_close(
        classifier.class_embeddings[0], F.normalize(encoded[:2].mean(0), dim=0)
    )
    torch.testing.assert_close(classifier.class_embeddings[1], encoded[2])


@pytest.mark.parametrize("objective", ["clip", "symile"])
def test_absent_query_modalities_follow_the_training_rule(objective):
    model = tiny_model(objective, {"x": tabular(3), "y": tabular(3), "z": tabular(2)})
    candidates = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    classifier = ZeroShotClassifier(model, candidates, "z")
    xs, ys = vectors(3, 3, seed=3), vectors(3, 3, seed=4)
    scores = classifier.scores({"x": xs, "y": [ys[0], None, ys[2]]})
    # row 1 has only x: all-ones in the Symile product, a dropped term in the pairwise sum,
    # both reduce to <x, c>
    only_x = model.encode("x", [xs[1]]) @ classifier.class_embeddings.T
    torch.testing.assert_close(scores[1:2], only_x)
    full = classifier.scores({"x": [xs[0]], "y": [ys[0]]})
    torch.testing.assert_close(scores[0:1], full)
    with pytest.raises(ValueError, match="query row 1 has no modality"):
        classifier.scores({"x": [xs[0], None], "y": [ys[0], None]})


def test_bad_inputs_name_the_problem():
    model = tiny_model("clip", {"x": tabular(2), "y": tabular(2)})
    with pytest.raises(ValueError, match="candidate_modality 'audio' is not one of"):
        ZeroShotClassifier(model, [[1.0, 2.0]], "audio")
    classifier = ZeroShotClassifier(model, [[1.0, 2.0], [2.0, 1.0]], "y")
    with pytest.raises(ValueError, match="equal lengths"):
        classifier.scores({"x": [[1.0, 2.0]], "y": [[1.0, 2.0], [0.0, 1.0]]})
    with pytest.raises(ValueError, match="has no '\\{\\}'"):
        ZeroShotClassifier.from_texts(model, ["a"], ["no placeholder"], text_modality="y")


CLASSES = {
    "classnames": {"en": ["zero", "one", "two"], "fr": ["zéro", "un", "deux"]},
    "templates": {"en": ["the digit {}"], "fr": ["le chiffre {}"]},
}


def test_run_zeroshot_known_answer(tmp_path):
    # queries are the prompts themselves, so with a pairwise model each query's own class has
    # similarity 1, the maximum: the prediction is the class the text names. Labels 2 of 8
    # records wrong -> top-1 = 6/8, confusion computed by hand.
    model = tiny_model("clip", {"text": TEXT, "x": tabular(2)})
    named = [0, 1, 2, 0, 1, 2, 0, 1]
    labels = [0, 1, 2, 0, 2, 2, 1, 1]
    records = [
        {
            "__key__": f"r{i:03d}",
            "txt": f"le chiffre {CLASSES['classnames']['fr'][c]}",
            "cls": labels[i],
        }
        for i, c in enumerate(named)
    ]
    shard = write_shards(tmp_path / "test-000000.tar", records)
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(CLASSES))
    result = run_zeroshot(model, shard, classes_file, ["text"], language="fr", ks=(1, 2))
    assert result["samples"] == 8
    assert result["classnames"] == ["zéro", "un", "deux"]
    assert result["metrics"]["top1"] == pytest.approx(6 / 8)
    assert result["confusion"] == [[2, 0, 0], [1, 2, 0], [0, 1, 2]]
    assert result["metrics"]["acc/un"] == pytest.approx(2 / 3)


def test_run_eval_report_with_hand_computed_recall(tmp_path):
    # x and y share weights, so equal raw vectors give equal embeddings: with y = x except
    # records 2 and 4 swapped, recall@1 is 4/6 in both directions
    towers = {"x": tabular(3), "y": tabular(3), "text": TEXT}
    model = tiny_model("clip", towers)
    model.towers["y"].load_state_dict(model.towers["x"].state_dict())
    model.projections["y"].load_state_dict(model.projections["x"].state_dict())
    xs = vectors(6, 3, seed=5)
    ys = [xs[i] for i in (0, 1, 4, 3, 2, 5)]
    names = ["zero", "one", "two"]
    records = [
        {
            "__key__": f"r{i}",
            "x.npy": xs[i],
            "y.npy": ys[i],
            "txt": f"the digit {names[i % 3]}",
            "cls": i % 3,
        }
        for i in range(6)
    ]
    shard = write_shards(tmp_path / "val-000000.tar", records)
    fields = {"x": "x.npy", "y": "y.npy", "text": "txt"}
    report = run_eval(
        model,
        shard,
        tmp_path / "eval",
        fields=fields,
        classes=CLASSES,
        zeroshot_modalities=["text"],
    )
    metrics = report["metrics"]
    assert metrics["instance/R@1/x->y"] == pytest.approx(4 / 6)
    assert metrics["instance/R@1/y->x"] == pytest.approx(4 / 6)
    assert metrics["instance/queries/x->y"] == 6
    assert metrics["zeroshot/text/top1"] == 1.0
    assert metrics["rank/x"] >= 1.0 and "gap/x-y" in metrics and "uniformity/text" in metrics
    assert not any("/*->" in name for name in metrics)  # pairwise model
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    markdown = (tmp_path / "eval" / "eval.md").read_text()
    assert "| x->y | instance | 0.6667 |" in markdown
    for figure in ("recall_curves.png", "similarity_x-y.png", "confusion_text.png"):
        assert (tmp_path / "eval" / figure).read_bytes()[:4] == b"\x89PNG"


def test_run_eval_nway_for_symile_models(tmp_path):
    towers = {"x": tabular(3), "y": tabular(2), "z": tabular(4)}
    model = tiny_model("symile", towers)
    data = {"x": vectors(10, 3, 6), "y": vectors(10, 2, 7), "z": vectors(10, 4, 8)}
    records = [{"__key__": f"r{i}", **{f"{m}.npy": data[m][i] for m in data}} for i in range(10)]
    shard = write_shards(tmp_path / "val-000000.tar", records)
    fields = {m: f"{m}.npy" for m in data}
    report = run_eval(model, shard, tmp_path / "eval", fields=fields, plots=False)
    embeddings = {m: model.encode(m, data[m]) for m in data}
    expected = nway_retrieval_metrics(embeddings, "y")
    for metric, value in expected.items():
        assert report["metrics"][f"instance/{metric}/*->y"] == pytest.approx(value)
