"""``mmalign eval``: retrieval, N-way retrieval, zero-shot and diagnostics in one report.

``run_eval`` embeds the shards once and writes into ``out_dir``:

- ``eval.json``: every metric (flat ``name -> value``), sample counts, confusion matrices;
- ``eval.md``: the same as markdown tables;
- ``recall_curves.png`` (recall@k for k = 1..50, every retrieval direction),
  ``similarity_{a}-{b}.png`` (cosine similarities of the first 32 paired samples) and
  ``confusion_{queries}.png`` (zero-shot, when classes are given).

Metric names: ``retrieval/{query}->{gallery}/{R@k|median_rank|mAP|queries}`` (pairs matched
by sample), ``nway/{target}/...`` (Symile models with three or more modalities: the target
retrieved from the product of the others), ``zeroshot/{queries}/{top1|...}``, the
diagnostics ``alignment/*``, ``uniformity/*``, ``rank/*``, ``gap/*``, and for a Matryoshka
model retrieval at each smaller trained prefix (``dim16/retrieval/...``, in ``eval.json``).

Example:
    >>> report = run_eval("runs/digits", "data/digits/test-000000.tar", "runs/digits/eval",
    ...                   classes="data/digits/classes.json")  # doctest: +SKIP
    >>> report["metrics"]["retrieval/image->text/R@1"]  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.eval.diagnostics import embedding_diagnostics
from mmalign.eval.loading import CollectedEmbeddings, collect_embeddings, load_model
from mmalign.eval.plots import plot_confusion, plot_recall_curves, plot_similarity
from mmalign.eval.retrieval import nway_recall, pairwise_recall, recall_curve
from mmalign.eval.zeroshot import (
    ZeroShotClassifier,
    evaluate_zeroshot,
    load_classes,
)
from mmalign.objectives.matryoshka import truncate

CURVE_MAX_K = 50
SIMILARITY_ROWS = 32


def _both_present(collected: CollectedEmbeddings, names: Sequence[str]) -> Tensor:
    return torch.stack([collected.present[name] for name in names]).all(dim=0)


def retrieval_report(
    collected: CollectedEmbeddings,
    pairs: Sequence[tuple[str, str]],
    ks: Sequence[int],
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Metrics of every pair in both directions, and the recall@k curve of each direction."""
    both_ways = [way for a, b in pairs for way in ((a, b), (b, a))]
    results = pairwise_recall(collected.embeddings, collected.present, both_ways, ks)
    metrics = {
        f"retrieval/{query}->{gallery}/{metric}": value
        for (query, gallery), result in results.items()
        for metric, value in result.items()
    }
    curves: dict[str, Tensor] = {}
    for first, second in pairs:
        if (first, second) not in results:
            continue
        rows = _both_present(collected, (first, second))
        x, y = collected.embeddings[first][rows], collected.embeddings[second][rows]
        max_k = min(CURVE_MAX_K, x.shape[0])
        curves[f"{first}->{second}"] = recall_curve(x, y, max_k)
        curves[f"{second}->{first}"] = recall_curve(y, x, max_k)
    return metrics, curves


def nway_report(collected: CollectedEmbeddings, ks: Sequence[int]) -> dict[str, float]:
    """Each modality retrieved from the product of all others, over fully present samples."""
    if len(collected.embeddings) < 3:
        return {}
    return {
        f"nway/{target}/{metric}": value
        for (_, target), result in nway_recall(collected.embeddings, collected.present, ks).items()
        for metric, value in result.items()
    }


def _default_text_modality(model: Any) -> str | None:
    return next((m for m in model.modalities if model.config.towers[m]["type"] == "text"), None)


def zeroshot_report(
    model: Any,
    collected: CollectedEmbeddings,
    classes: str | Path | Mapping[str, Any],
    query_sets: Sequence[Sequence[str]],
    text_modality: str,
    language: str | None,
    ks: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """Zero-shot results per set of query modalities, keyed ``"image"`` or ``"image+audio"``."""
    classnames, prompts = load_classes(classes, language)
    classifier = ZeroShotClassifier(model, prompts, text_modality, classnames=classnames)
    results = {}
    for queries in query_sets:
        has_any = torch.stack([collected.present[m] for m in queries]).any(dim=0)
        if not ((collected.labels >= 0) & has_any).any():
            continue
        results["+".join(queries)] = evaluate_zeroshot(classifier, collected, queries, ks)
    return results


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table (floats to 4 decimals), followed by an empty line.

    Example:
        >>> markdown_table(["metric", "value"], [["R@1", 0.5]])
        ['| metric | value |', '|---|---|', '| R@1 | 0.5000 |', '']
    """

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _grouped(metrics: Mapping[str, float], prefix: str) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        if name.startswith(prefix):
            group, metric = name[len(prefix) :].rsplit("/", 1)
            groups.setdefault(group, {})[metric] = value
    return groups


def markdown_report(report: Mapping[str, Any], ks: Sequence[int]) -> str:
    """The report as markdown tables (retrieval, N-way, zero-shot, diagnostics, figures)."""
    metrics = report["metrics"]
    lines = [
        "# Evaluation",
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['shards']}`",
        f"- samples: {report['samples']}",
        "",
    ]
    header = [*(f"R@{k}" for k in ks), "median rank", "mAP", "queries"]
    columns = [*(f"R@{k}" for k in ks), "median_rank", "mAP", "queries"]
    for title, prefix, first in (
        ("Retrieval (pairs of modalities)", "retrieval/", "query -> gallery"),
        ("N-way retrieval (target from the product of the others)", "nway/", "target"),
    ):
        groups = _grouped(metrics, prefix)
        if groups:
            rows = [[group, *(values[c] for c in columns)] for group, values in groups.items()]
            lines += [f"## {title}", "", *markdown_table([first, *header], rows)]
    if report["zeroshot"]:
        zk = [k for k in (1, 5) if f"top{k}" in next(iter(report["zeroshot"].values()))["metrics"]]
        rows = [
            [
                queries,
                *(r["metrics"][f"top{k}"] for k in zk),
                r["metrics"]["balanced_accuracy"],
                r["samples"],
            ]
            for queries, r in report["zeroshot"].items()
        ]
        header = ["queries", *(f"top-{k}" for k in zk), "balanced accuracy", "samples"]
        lines += ["## Zero-shot classification", "", *markdown_table(header, rows)]
    diagnostics = [
        [name, value]
        for name, value in metrics.items()
        if name.split("/")[0] in {"alignment", "uniformity", "rank", "gap"}
    ]
    lines += ["## Embedding diagnostics", "", *markdown_table(["metric", "value"], diagnostics)]
    if report["figures"]:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in report["figures"]), ""]
    return "\n".join(lines)


def _write_figures(
    out_dir: Path,
    collected: CollectedEmbeddings,
    pairs: Sequence[tuple[str, str]],
    curves: Mapping[str, Tensor],
    zeroshot: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    figures = []
    if curves:
        figures.append(plot_recall_curves(curves, out_dir / "recall_curves.png"))
    for first, second in pairs:
        rows = _both_present(collected, (first, second)).nonzero().squeeze(1)[:SIMILARITY_ROWS]
        if rows.numel() >= 2:
            x, y = collected.embeddings[first][rows], collected.embeddings[second][rows]
            path = out_dir / f"similarity_{first}-{second}.png"
            figures.append(plot_similarity(x, y, path, f"{first} (rows) vs {second} (columns)"))
    for queries, result in zeroshot.items():
        path = out_dir / f"confusion_{queries}.png"
        confusion = torch.tensor(result["confusion"])
        figures.append(
            plot_confusion(confusion, result["classnames"], path, f"zero-shot {queries}")
        )
    return [figure.name for figure in figures]


def run_eval(
    model_or_run_dir: Any,
    shards: str | Sequence[str],
    out_dir: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    fields: Mapping[str, str] | None = None,
    classes: str | Path | Mapping[str, Any] | None = None,
    zeroshot_modalities: Sequence[str] | None = None,
    text_modality: str | None = None,
    language: str | None = None,
    label_field: str = "cls",
    retrieval_pairs: Sequence[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    workers: int = 0,
    max_samples: int | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate a model (object, model directory or run directory) on shards; write the report.

    ``modalities`` default to all of the model's; ``retrieval_pairs`` to every pair of them.
    With ``classes`` (a classes.json path or dict), zero-shot classification encodes the class
    prompts with ``text_modality`` (default: the model's first text tower) and classifies
    each of ``zeroshot_modalities`` (default: every other modality) alone and, when there are
    several, all of them together. Returns the report that ``eval.json`` holds.

    Example:
        >>> run_eval(model, "val-000000.tar", "out")["samples"]  # doctest: +SKIP
        180
    """
    model_source = None if isinstance(model_or_run_dir, torch.nn.Module) else model_or_run_dir
    model = load_model(model_or_run_dir)
    modalities = list(modalities or model.modalities)
    collected = collect_embeddings(
        model,
        shards,
        modalities,
        fields=fields,
        run_dir=model_source,
        batch_size=batch_size,
        workers=workers,
        label_field=label_field if classes is not None else None,
        max_samples=max_samples,
    )
    pairs = list(retrieval_pairs or itertools.combinations(modalities, 2))
    metrics, curves = retrieval_report(collected, pairs, ks)
    if model.objective.scores_jointly:
        metrics.update(nway_report(collected, ks))
    metrics.update(embedding_diagnostics(collected.embeddings, present=collected.present))
    for dim in (model.config.matryoshka or [])[:-1]:  # retrieval at each trained prefix
        embeddings = {name: truncate(value, dim) for name, value in collected.embeddings.items()}
        prefix, _ = retrieval_report(
            dataclasses.replace(collected, embeddings=embeddings), pairs, ks
        )
        metrics.update({f"dim{dim}/{name}": value for name, value in prefix.items()})
    zeroshot: dict[str, dict[str, Any]] = {}
    if classes is not None:
        text = text_modality or _default_text_modality(model)
        if text is None or text not in modalities:
            raise ValueError(
                f"zero-shot needs a text modality among {modalities} to encode the class "
                "prompts; pass text_modality (--text-modality)"
            )
        queries = list(zeroshot_modalities or [m for m in modalities if m != text])
        query_sets = [[m] for m in queries] + ([queries] if len(queries) > 1 else [])
        zeroshot = zeroshot_report(model, collected, classes, query_sets, text, language, (1, 5))
        for name, result in zeroshot.items():
            metrics.update({f"zeroshot/{name}/{k}": v for k, v in result["metrics"].items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(model_source) if model_source is not None else "<in-memory model>",
        "shards": shards if isinstance(shards, str) else list(shards),
        "samples": len(collected.keys),
        "metrics": metrics,
        "zeroshot": zeroshot,
        "figures": _write_figures(out_dir, collected, pairs, curves, zeroshot) if plots else [],
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "eval.md").write_text(markdown_report(report, ks))
    return report
