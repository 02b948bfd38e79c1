"""Zero-shot classification: class prompts (or raw candidates of any modality) as classifiers.

Each class gets one embedding: the candidates of the class (prompt templates filled with the
class name, or raw samples) are encoded, averaged and renormalized, as CLIP does. A query is
one or more modalities of one sample; its score for class c is the model objective's
:meth:`~mmalign.objectives.Objective.score`:

- Symile models: the multilinear inner product (MIP) of the class embedding with the
  elementwise product of the query embeddings, ``sum_d c_d * prod_m q_{m,d}``.
- Pairwise models (clip, anchored, sigmoid): the sum of pairwise similarities,
  ``sum_m <q_m, c>`` (the Symile paper's zero-shot rule for CLIP).

A query may lack some modalities (``None`` entries): absent modalities are the all-ones
vector in the Symile product and dropped terms in the pairwise sum, the same rule as in
training. Probabilities are the softmax of ``logit_scale * scores``.

Example:
    >>> model = AlignmentModel.from_pretrained("runs/digits/model")  # doctest: +SKIP
    >>> clf = ZeroShotClassifier.from_texts(model, ["zero", "one"], "a {}")  # doctest: +SKIP
    >>> clf.predict({"image": [image_of_zero, image_of_one]})  # doctest: +SKIP
    tensor([0, 1])
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.embeddings import truncate
from mmalign.errors import ConfigError
from mmalign.eval.classification import classification_metrics, confusion_matrix
from mmalign.eval.loading import (
    CollectedEmbeddings,
    check_modalities,
    collect_embeddings,
    load_model,
)

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel


def _candidate_samples(candidate: Any, index: int) -> list[Any]:
    """One class's candidates as a list of raw samples.

    A ``list`` holds several samples unless all its items are numbers (one tabular vector);
    anything else (str, tuple, array, dict, image, path) is one sample.
    """
    if isinstance(candidate, list) and not all(
        isinstance(item, numbers.Real) for item in candidate
    ):
        if not candidate:
            raise ValueError(f"candidates[{index}] is an empty list; give at least one sample")
        return candidate
    return [candidate]


def fill_templates(classnames: Sequence[str], templates: str | Sequence[str]) -> list[list[str]]:
    """The prompts of each class: every template with ``{}`` replaced by the class name.

    Example:
        >>> fill_templates(["cat"], ["a {}", "the {}"])
        [['a cat', 'the cat']]
    """
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ConfigError(
            "no prompt template (templates); give at least one, e.g. ['a photo of a {}']"
        )
    for template in templates:
        if "{}" not in template:
            raise ConfigError(
                f"template {template!r} has no '{{}}' where the class name goes (templates); "
                "write one, e.g. 'a photo of a {}'"
            )
    return [[template.replace("{}", name) for template in templates] for name in classnames]


def encode_queries(
    model: AlignmentModel, queries: Mapping[str, Sequence[Any]], batch_size: int = 64
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Encode raw query samples (modality -> list, ``None`` = absent) to embeddings + presence."""
    if not queries:
        raise ValueError("queries is empty; give a dict like {'image': [sample, ...]}")
    lengths = {name: len(raws) for name, raws in queries.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"query lists must have equal lengths; got {lengths}")
    rows = next(iter(lengths.values()))
    embeddings, present = {}, {}
    for name, raws in queries.items():
        if name not in model.modalities:
            raise ValueError(
                f"query modality {name!r} is not one of the model's {model.modalities}"
            )
        mask = torch.tensor([raw is not None for raw in raws], dtype=torch.bool)
        embedding = torch.zeros(rows, model.dim)
        if mask.any():
            samples = [raw for raw in raws if raw is not None]
            embedding[mask] = model.encode(name, samples, batch_size=batch_size).float().cpu()
        embeddings[name], present[name] = embedding, mask
    return embeddings, present


class ZeroShotClassifier:
    """A classifier whose classes are candidates of one modality (see the module docstring).

    ``candidates`` has one entry per class: one raw sample, or a list of several raw samples
    (their embeddings are averaged then renormalized). ``dim`` classifies with the first
    ``dim`` coordinates of every embedding, renormalized (a Matryoshka prefix).

    Example (classes given as vectors of a tabular modality ``y``, two for the second class):
        >>> import numpy as np
        >>> from mmalign.model import AlignmentModel
        >>> tabular = {"type": "tabular", "in_features": 4}
        >>> model = AlignmentModel.from_config({"dim": 8, "towers": {"x": tabular, "y": tabular}})
        >>> y0, y1a, y1b, *xs = np.random.default_rng(0).normal(size=(11, 4)).astype("float32")
        >>> clf = ZeroShotClassifier(model, [y0, [y1a, y1b]], "y", classnames=["zero", "one"])
        >>> clf.predict_proba({"x": xs}).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        model: AlignmentModel,
        candidates: Sequence[Any],
        candidate_modality: str,
        *,
        classnames: Sequence[str] | None = None,
        batch_size: int = 64,
        dim: int | None = None,
    ) -> None:
        if candidate_modality not in model.modalities:
            raise ValueError(
                f"candidate_modality {candidate_modality!r} is not one of the model's "
                f"{model.modalities}"
            )
        groups = [_candidate_samples(candidate, i) for i, candidate in enumerate(candidates)]
        if not groups:
            raise ValueError("candidates is empty; give one candidate (or list) per class")
        flat = [sample for group in groups for sample in group]
        encoded = model.encode(candidate_modality, flat, batch_size, dim=dim).float().cpu()
        means = [chunk.mean(dim=0) for chunk in encoded.split([len(g) for g in groups])]
        self.model = model
        self.candidate_modality = candidate_modality
        self.class_embeddings = F.normalize(torch.stack(means), dim=-1)
        self.classnames = list(classnames) if classnames is not None else None
        self.batch_size = batch_size
        self.dim = dim
        if self.classnames is not None and len(self.classnames) != len(groups):
            raise ValueError(f"{len(self.classnames)} classnames for {len(groups)} candidates")

    @classmethod
    def from_texts(
        cls,
        model: AlignmentModel,
        classnames: Sequence[str],
        templates: str | Sequence[str] = "{}",
        text_modality: str = "text",
        batch_size: int = 64,
        dim: int | None = None,
    ) -> ZeroShotClassifier:
        """Classes from names and prompt templates (``{}`` = the class name), CLIP style.

        Example:
            >>> clf = ZeroShotClassifier.from_texts(model, ["0", "1"], "a {}")  # doctest: +SKIP
        """
        prompts = fill_templates(classnames, templates)
        return cls(
            model, prompts, text_modality, classnames=classnames, batch_size=batch_size, dim=dim
        )

    @property
    def logit_scale(self) -> float:
        """The model's temperature multiplier (exp of its log scale, clamped as in training)."""
        return float(self.model.logit_scale_value().detach())

    def scores_from_embeddings(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Scores ``[N, C]`` for already-encoded queries (modality -> ``[N, d]``; wider ones
        are cut to the classifier's ``dim`` and renormalized)."""
        width = self.class_embeddings.shape[1]
        embeddings = {
            name: truncate(value, width) if value.shape[1] != width else value
            for name, value in embeddings.items()
        }
        return self.model.objective.score(embeddings, self.class_embeddings, present)

    def scores(self, queries: Mapping[str, Sequence[Any]]) -> Tensor:
        """Scores ``[N, C]`` of raw queries (modality -> list of samples, ``None`` = absent)."""
        embeddings, present = encode_queries(self.model, queries, self.batch_size)
        return self.scores_from_embeddings(embeddings, present)

    def predict_proba(self, queries: Mapping[str, Sequence[Any]]) -> Tensor:
        """Class probabilities ``[N, C]``: softmax of ``logit_scale * scores``."""
        return torch.softmax(self.logit_scale * self.scores(queries), dim=-1)

    def predict(self, queries: Mapping[str, Sequence[Any]]) -> Tensor:
        """The best-scoring class index of each query, ``LongTensor[N]``."""
        return self.scores(queries).argmax(dim=-1)


def check_text_modality(model: AlignmentModel, name: str | None) -> str:
    """``name`` when it is a text tower of ``model`` (it encodes the class prompts), else a
    :class:`~mmalign.errors.ConfigError` naming ``--text-modality`` and the text towers.

    Example:
        >>> from types import SimpleNamespace
        >>> towers = {"photo": {"type": "image"}, "caption": {"type": "text"}}
        >>> from mmalign.config import ModelConfig
        >>> model = SimpleNamespace(modalities=list(towers), config=ModelConfig(towers=towers))
        >>> check_text_modality(model, "caption")
        'caption'
    """
    texts = model.config.modalities_of_type("text")
    if name is not None and name in texts:
        return name
    if not texts:
        raise ConfigError(
            "the model has no text tower to encode the class prompts (--text-modality); "
            "zero-shot from prompts needs one (--candidate-modality takes raw candidates)"
        )
    what = "is not a modality" if name not in model.modalities else "is not a text tower"
    raise ConfigError(
        f"{name!r} {what} (--text-modality); class prompts are encoded by a text tower: "
        f"{', '.join(texts)}"
    )


def read_classes_file(path: Path) -> Any:
    """The JSON content of a classes file; a missing file, a directory or invalid JSON is a
    :class:`~mmalign.errors.ConfigError` naming the file (and the line) and ``--classes``.

    Example:
        >>> read_classes_file(Path("/"))
        Traceback (most recent call last):
        ...
        mmalign.errors.ConfigError: classes file / is a directory (--classes); pass ...
    """
    if not path.exists():
        raise ConfigError(
            f"classes file {path} does not exist (--classes); pass a classes.json "
            "(as mmalign prep make-demo writes one)"
        )
    if path.is_dir():
        raise ConfigError(
            f"classes file {path} is a directory (--classes); pass the classes.json file itself"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        line = f":{error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise ConfigError(
            f"classes file is not valid JSON: {error} ({path}{line}); fix it, e.g. "
            '{"classnames": ["cat", "dog"], "templates": ["a photo of a {}"]}'
        ) from None


def load_classes(
    path: str | Path | Mapping[str, Any], language: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Class names and each class's prompts from a classes file.

    The file is ``{"classnames": {lang: [...]}, "templates": {lang: [...]}}`` (or plain lists
    instead of the per-language dicts). ``language=None`` takes the first language; ``"all"``
    pools the prompts of every language (class names are those of the first language).

    Example:
        >>> load_classes({"classnames": ["cat"], "templates": ["a {}"]})
        (['cat'], [['a cat']])
    """
    where = "classes" if isinstance(path, Mapping) else str(path)
    data = dict(path) if isinstance(path, Mapping) else read_classes_file(Path(path))
    if not isinstance(data, Mapping) or "classnames" not in data:
        raise ConfigError(
            f"no class names ({where}:classnames); add a 'classnames' entry: "
            "{'classnames': {lang: [...]}, 'templates': {lang: ['a photo of a {}']}}"
        )
    names = data["classnames"]
    templates = data.get("templates", "{}")
    if not isinstance(names, Mapping):
        return list(names), fill_templates(names, templates)
    if not isinstance(templates, Mapping):
        templates = dict.fromkeys(names, templates)
    languages = list(names) if language == "all" else [language or next(iter(names))]
    for lang in languages:
        if lang not in names or lang not in templates:
            raise ConfigError(
                f"language {lang!r} is missing from classnames or templates "
                f"({where}:classnames.{lang}); use one of {sorted(names)} or 'all' (--language)"
            )
    prompts = [fill_templates(names[lang], templates[lang]) for lang in languages]
    pooled = [
        [p for per_language in prompts for p in per_language[c]] for c in range(len(prompts[0]))
    ]
    return list(names[languages[0]]), pooled


def run_zeroshot(
    model: AlignmentModel,
    shards: str | Sequence[str],
    classes: str | Path | Mapping[str, Any],
    query_modalities: Sequence[str],
    *,
    text_modality: str = "text",
    language: str | None = None,
    candidate_modality: str | None = None,
    fields: Mapping[str, str] | None = None,
    label_field: str = "cls",
    batch_size: int = 64,
    workers: int = 0,
    max_samples: int | None = None,
    ks: Sequence[int] = (1, 5),
    dim: int | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy over shards, labels from the ``label_field`` of each record
    (``dim``: with the first ``dim`` coordinates of every embedding, renormalized).

    Class prompts from ``classes`` (a classes.json path or dict, see :func:`load_classes`)
    are encoded with ``text_modality`` (or with ``candidate_modality`` when that tower takes
    strings). Returns ``{"metrics": {...}, "confusion": [[...]], "classnames": [...],
    "samples": N}``; metrics hold ``top{k}``, ``balanced_accuracy`` and ``acc/{class}``.

    Example:
        >>> run_zeroshot("runs/digits", "data/digits/test-000000.tar", "data/digits/classes.json",
        ...              ["image"])["metrics"]["top1"]  # doctest: +SKIP
        0.93
    """
    model_source = model
    model = load_model(model)
    check_modalities(model, query_modalities, "--query")
    classnames, prompts = load_classes(classes, language)
    if candidate_modality is None:
        check_text_modality(model, text_modality)
    else:
        check_modalities(model, [candidate_modality], "--candidate-modality")
    classifier = ZeroShotClassifier(
        model, prompts, candidate_modality or text_modality, classnames=classnames, dim=dim
    )
    collected = collect_embeddings(
        model,
        shards,
        list(query_modalities),
        fields=fields,
        run_dir=None if isinstance(model_source, torch.nn.Module) else model_source,
        batch_size=batch_size,
        workers=workers,
        label_field=label_field,
        max_samples=max_samples,
    )
    return evaluate_zeroshot(classifier, collected, query_modalities, ks)


def evaluate_zeroshot(
    classifier: ZeroShotClassifier,
    collected: CollectedEmbeddings,
    query_modalities: Sequence[str],
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Zero-shot metrics on embedded samples: those with a label and a query modality.

    Returns ``{"metrics", "confusion", "classnames", "samples"}`` (see :func:`run_zeroshot`).
    """
    usable = collected.labels >= 0
    usable &= torch.stack([collected.present[m] for m in query_modalities]).any(dim=0)
    if not usable.any():
        raise ValueError(
            f"no sample has both a label and one of the query modalities "
            f"{list(query_modalities)}; check the data, label field and fields"
        )
    queries = {m: collected.embeddings[m][usable] for m in query_modalities}
    present = {m: collected.present[m][usable] for m in query_modalities}
    scores = classifier.scores_from_embeddings(queries, present)
    labels = collected.labels[usable]
    classnames = classifier.classnames or [str(c) for c in range(scores.shape[1])]
    return {
        "metrics": classification_metrics(scores, labels, classnames, ks),
        "confusion": confusion_matrix(scores.argmax(dim=1), labels, len(classnames)).tolist(),
        "classnames": classnames,
        "samples": int(labels.numel()),
    }
