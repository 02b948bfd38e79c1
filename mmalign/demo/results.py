"""The demo's measurements of its trained runs.

The digits model is measured on its test split (:func:`evaluate_digits`): zero-shot image
classification with each language's class prompts, class-level retrieval between
modalities, zero-shot and text->image retrieval at the smallest Matryoshka prefix
(:func:`smallest_prefix`) and two figures. Each digits-sum model classifies the image's
digit zero-shot from caption + tone (:func:`sum_zeroshot`). The digits model's test images
are exported, indexed and searched with a caption and a ``.wav`` tone
(:func:`index_and_search`).

Example:
    >>> run = train_run("digits", default_configs_dir(), data, out, quick=True, reuse=False)
    ... # doctest: +SKIP
    >>> evaluate_digits(run, out)["zeroshot"]["en"]["metrics"]["top1"]  # doctest: +SKIP
    0.986
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import soundfile
import torch

from mmalign.data.records import iterate_records
from mmalign.demo.runs import Run
from mmalign.embeddings import truncate
from mmalign.eval.loading import CollectedEmbeddings, collect_embeddings
from mmalign.eval.plots import plot_confusion, plot_similarity
from mmalign.eval.retrieval import pairwise_recall
from mmalign.eval.zeroshot import ZeroShotClassifier, evaluate_zeroshot, load_classes
from mmalign.export import build_index, export_embeddings, search

LANGUAGES = ("en", "fr", "de", "es")
RETRIEVAL_PAIRS = (("audio", "image"), ("graph", "text"), ("image", "text"), ("text", "image"))
MOTION_PAIRS = (
    ("audio", "video"),
    ("audio", "image"),
    ("video", "image"),
    ("graph", "text"),
    ("video", "text"),
    ("trajectory", "text"),
)
"""Class-level retrieval pairs of the six-modality run (``digits-motion``)."""
MOTION_ZEROSHOT = ("image", "graph", "video", "trajectory")
"""Modalities of ``digits-motion`` classified zero-shot (English prompts)."""
REFERENCES_PER_CLASS = 8
"""Training images per class averaged into the digits-sum zero-shot candidates."""
SEARCH_K = 5


def embed_test_split(run: Run, modalities: Sequence[str]) -> CollectedEmbeddings:
    """Embeddings and labels of the run's test split.

    Example:
        >>> embed_test_split(run, ["image", "text"]).embeddings["image"].shape  # doctest: +SKIP
        torch.Size([1440, 64])
    """
    data = run.config.data
    return collect_embeddings(
        run.model,
        run.test_shards,
        list(modalities),
        fields=data.fields,
        label_field="cls",
        batch_size=256,
    )


def zeroshot_by_language(run: Run, collected: CollectedEmbeddings) -> dict[str, dict[str, Any]]:
    """Zero-shot image classification with each language's class prompts.

    Example:
        >>> sorted(zeroshot_by_language(run, collected))  # doctest: +SKIP
        ['de', 'en', 'es', 'fr']
    """
    results = {}
    for language in LANGUAGES:
        classnames, prompts = load_classes(run.classes, language)
        classifier = ZeroShotClassifier(run.model, prompts, "text", classnames=classnames)
        results[language] = evaluate_zeroshot(classifier, collected, ["image"], ks=(1, 5))
    return results


def class_retrieval(
    collected: CollectedEmbeddings, pairs: Sequence[tuple[str, str]] = RETRIEVAL_PAIRS
) -> dict[str, dict[str, float]]:
    """Class-level retrieval (relevant = same class) for ``pairs``.

    Example:
        >>> class_retrieval(collected)["audio->image"]["R@1"]  # doctest: +SKIP
        1.0
    """
    results = pairwise_recall(
        collected.embeddings,
        collected.present,
        pairs,
        (1, 5, 10),
        labels=collected.labels,
    )
    return {f"{query}->{gallery}": metrics for (query, gallery), metrics in results.items()}


def smallest_prefix(run: Run, collected: CollectedEmbeddings) -> dict[str, Any] | None:
    """Zero-shot image top-1 (English prompts) and class-level text->image R@1 at the
    smallest trained Matryoshka prefix (first ``dim`` coordinates, renormalized); ``None``
    when the model was trained at full size only.

    Example:
        >>> smallest_prefix(run, collected)["dim"]  # doctest: +SKIP
        16
    """
    prefixes = run.model.config.matryoshka
    if not prefixes or len(prefixes) < 2:
        return None
    dim = prefixes[0]
    classnames, prompts = load_classes(run.classes, "en")
    classifier = ZeroShotClassifier(run.model, prompts, "text", classnames=classnames, dim=dim)
    zeroshot = evaluate_zeroshot(classifier, collected, ["image"], ks=(1,))
    pair = ("text", "image")
    truncated = {name: truncate(collected.embeddings[name], dim) for name in pair}
    recall = pairwise_recall(truncated, collected.present, [pair], (1,), labels=collected.labels)
    return {
        "dim": dim,
        "prefixes": list(prefixes),
        "zeroshot_en": zeroshot["metrics"]["top1"],
        "text->image R@1": recall[pair]["R@1"],
    }


def similarity_rows(labels: torch.Tensor, per_class: int = 4) -> torch.Tensor:
    """Row indices of the first ``per_class`` samples of each class, grouped by class.

    Example:
        >>> similarity_rows(torch.tensor([2, 0, 2, 1, 0]), per_class=1).tolist()
        [1, 3, 0]
    """
    rows = [
        (labels == label).nonzero().squeeze(1)[:per_class] for label in labels.unique().tolist()
    ]
    return torch.cat(rows)


def digits_figures(
    out_dir: Path, collected: CollectedEmbeddings, zeroshot: dict[str, dict[str, Any]]
) -> dict[str, Path]:
    """The English zero-shot confusion matrix and an image-text similarity matrix."""
    english = zeroshot["en"]
    confusion = plot_confusion(
        torch.tensor(english["confusion"]),
        english["classnames"],
        out_dir / "digits" / "confusion_zeroshot_en.png",
        "digits: zero-shot image classification (English prompts)",
    )
    rows = similarity_rows(collected.labels)
    similarity = plot_similarity(
        collected.embeddings["image"][rows],
        collected.embeddings["text"][rows],
        out_dir / "digits" / "similarity_image_text.png",
        "test images (rows) vs captions (columns), 4 per digit",
    )
    return {"confusion": confusion, "similarity": similarity}


def evaluate_digits(run: Run, out_dir: Path) -> dict[str, Any]:
    """Zero-shot per language, class-level retrieval and the figures of the digits model.

    Example:
        >>> evaluate_digits(run, Path("runs/demo"))["retrieval"]["graph->text"]["R@1"]
        ... # doctest: +SKIP
        1.0
    """
    collected = embed_test_split(run, run.model.modalities)
    zeroshot = zeroshot_by_language(run, collected)
    retrieval = class_retrieval(collected)
    figures = digits_figures(out_dir, collected, zeroshot)
    prefix = smallest_prefix(run, collected)
    for language, result in zeroshot.items():
        print(f"zero-shot image accuracy, {language} prompts: {result['metrics']['top1']:.1%}")
    for pair, metrics in retrieval.items():
        print(f"{pair} class-level R@1 {metrics['R@1']:.1%}")
    if prefix is not None:
        print(
            f"first {prefix['dim']} dimensions: zero-shot (en) {prefix['zeroshot_en']:.1%}, "
            f"text->image class-level R@1 {prefix['text->image R@1']:.1%}"
        )
    return {
        "samples": len(collected.keys),
        "zeroshot": zeroshot,
        "retrieval": retrieval,
        "matryoshka": prefix,
        "figures": figures,
    }


def evaluate_motion(run: Run) -> dict[str, Any]:
    """Zero-shot image, graph, video and trajectory classification (English prompts) and
    class-level retrieval (:data:`MOTION_PAIRS`) of the six-modality model on its test split.

    Example:
        >>> evaluate_motion(motion_run)["zeroshot"]["video"]["metrics"]["top1"]
        ... # doctest: +SKIP
        0.99
    """
    collected = embed_test_split(run, run.model.modalities)
    classnames, prompts = load_classes(run.classes, "en")
    classifier = ZeroShotClassifier(run.model, prompts, "text", classnames=classnames)
    zeroshot = {
        modality: evaluate_zeroshot(classifier, collected, [modality], ks=(1, 5))
        for modality in MOTION_ZEROSHOT
    }
    retrieval = class_retrieval(collected, MOTION_PAIRS)
    for modality, result in zeroshot.items():
        print(f"zero-shot {modality} accuracy, en prompts: {result['metrics']['top1']:.1%}")
    for pair, metrics in retrieval.items():
        print(f"{pair} class-level R@1 {metrics['R@1']:.1%}")
    return {"samples": len(collected.keys), "zeroshot": zeroshot, "retrieval": retrieval}


def reference_images(shards: Sequence[str], per_class: int, classes: int = 10) -> list[list]:
    """The first ``per_class`` training images of each class (zero-shot candidates).

    Example:
        >>> [len(images) for images in reference_images(shards, per_class=2)]  # doctest: +SKIP
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    found: dict[int, list] = {label: [] for label in range(classes)}
    for record in iterate_records(list(shards), {"image": "png", "label": "cls"}):
        label = record.get("label")
        if label in found and "image" in record and len(found[label]) < per_class:
            found[label].append(record["image"])
        if all(len(images) == per_class for images in found.values()):
            break
    missing = [label for label, images in found.items() if not images]
    if missing:
        raise ValueError(
            f"no training image of class(es) {missing} in {shards[0]}...; the zero-shot "
            "candidates need one per class (build more data: a larger --limit)"
        )
    return [found[label] for label in range(classes)]


def sum_zeroshot(run: Run) -> dict[str, Any]:
    """Zero-shot accuracy of the image's digit from caption + tone (digits-sum).

    Example:
        >>> sum_zeroshot(symile_run)["metrics"]["top1"]  # doctest: +SKIP
        0.998
    """
    references = reference_images(run.train_shards, REFERENCES_PER_CLASS)
    classifier = ZeroShotClassifier(run.model, references, "image")
    collected = embed_test_split(run, ["text", "audio"])
    result = evaluate_zeroshot(classifier, collected, ["text", "audio"], ks=(1, 5))
    result["rule"] = (
        "MIP (Symile)" if run.model.objective.scores_jointly else "sum of pairwise similarities"
    )
    return result


def first_test_clip(shards: Sequence[str], digit: int) -> tuple[Any, int]:
    """The first test tone of ``digit``: ``(waveform, sample_rate)``."""
    for record in iterate_records(list(shards), {"audio": "flac", "label": "cls"}):
        if record.get("label") == digit and "audio" in record:
            return record["audio"]
    raise ValueError(f"no test record of digit {digit} with audio in {shards[0]}...")


def index_and_search(run: Run, out_dir: Path, digit: int = 7) -> dict[str, Any]:
    """Export test image embeddings, index them, search with a caption and a .wav tone.

    Example:
        >>> found = index_and_search(run, Path("runs/demo"))  # doctest: +SKIP
        >>> [hit["cls"] for hit in found["searches"]["audio"]["hits"]]  # doctest: +SKIP
        [7, 7, 7, 7, 7]
    """
    export_dir = out_dir / "embeddings"
    if (export_dir / "manifest.json").is_file():  # an earlier demo's export; anything else
        shutil.rmtree(export_dir)  # there is refused by the export itself
    data = run.config.data
    manifest = export_embeddings(
        run.model,
        run.test_shards,
        ["image"],
        export_dir,
        fields=data.fields,
        metadata_fields=["cls"],
        progress=False,
    )
    index_path = build_index(export_dir, "image")
    classnames, _ = load_classes(run.classes, "en")
    text_query = f"the digit {classnames[digit]}"
    waveform, sample_rate = first_test_clip(run.test_shards, digit)
    wav_path = out_dir / "search" / f"query_tone_{digit}.wav"
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(wav_path, waveform, sample_rate)
    queries = {"text": (text_query, text_query), "audio": (str(wav_path), wav_path.name)}
    hits = {
        modality: {
            "query": shown,
            "hits": search(export_dir, run.model, raw, modality, k=SEARCH_K, target="image"),
        }
        for modality, (raw, shown) in queries.items()
    }
    return {
        "rows": manifest["rows"],
        "index": index_path,
        "digit": digit,
        "wav": wav_path,
        "searches": hits,
    }


def print_hits(search_results: dict[str, Any]) -> None:
    """Print the hits of :func:`index_and_search`, one line each."""
    digit = search_results["digit"]
    for modality, found in search_results["searches"].items():
        print(f"search image index with {modality} query {found['query']!r} (digit {digit}):")
        for hit in found["hits"]:
            print(f"  {hit['rank']}. {hit['key']}  class {hit['cls']}  score {hit['score']:.3f}")
