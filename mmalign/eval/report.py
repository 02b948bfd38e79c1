"""``mmalign eval``: retrieval (instance and class level), zero-shot and diagnostics.

``run_eval`` embeds the shards once and writes into ``out_dir``:

- ``eval.json``: every metric (flat ``name -> value``), sample counts, confusion matrices;
- ``eval.md``: the same as markdown tables;
- ``recall_curves.png`` (recall@k for k = 1..50, every retrieval direction, instance level
  solid, class level dashed in the same colour), ``similarity_{a}-{b}.png`` (cosine
  similarities of the first 32 paired samples) and ``confusion_{queries}.png`` (zero-shot,
  when classes are given).

Metric names: ``{level}/{metric}/{query}->{gallery}`` with level ``instance`` (a hit is the
query's own paired item) or ``class`` (a hit is any item of the query's class, when the
records have labels: ``label_field``), metric ``R@k``, ``median_rank``, ``mAP`` or
``queries``; query ``*`` for N-way retrieval (Symile models with three or more modalities: the
target from the product of the others). Then ``zeroshot/{queries}/{top1|...}`` and the
diagnostics ``alignment/*``, ``uniformity/*``, ``rank/*``, ``gap/*``;
for a Matryoshka model retrieval at each smaller trained prefix (``dim16/instance/R@1/...``,
in ``eval.json``).

Example:
    >>> report = run_eval("runs/digits", "data/digits/test-000000.tar", "runs/digits/eval",
    ...                   classes="data/digits/classes.json")  # doctest: +SKIP
    >>> report["metrics"]["class/R@1/image->text"]  # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmalign.embeddings import check_prefix, truncate
from mmalign.errors import ConfigError
from mmalign.eval.diagnostics import embedding_diagnostics
from mmalign.eval.loading import (
    CollectedEmbeddings,
    check_modalities,
    collect_embeddings,
    load_model,
)
from mmalign.eval.retrieval import nway_recall, pairwise_recall, recall_curve
from mmalign.eval.zeroshot import (
    ZeroShotClassifier,
    check_text_modality,
    evaluate_zeroshot,
    load_classes,
)
from mmalign.files import refuse_links, write_json, write_text
from mmalign.output_owner import Output, check_output, record_output

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

LEVELS = ("instance", "class")
"""Retrieval levels: a hit is the paired item (instance) or any item of the class (class)."""
CURVE_MAX_K = 50
SIMILARITY_ROWS = 32
REPORT = Output("eval", "--out", ("probe.json", "*.png"), nested=True, folder="report directory")
"""The owner of a report folder (:mod:`mmalign.output_owner`), which may lie in the model it
evaluates (MODEL/eval); ``probe.json`` is written after the record (``eval --linear-probe``),
the figures before ``eval.json``."""


def _both_present(collected: CollectedEmbeddings, names: Sequence[str]) -> Tensor:
    return torch.stack([collected.present[name] for name in names]).all(dim=0)


def _labels_or_none(collected: CollectedEmbeddings) -> Tensor | None:
    """The labels when some record has one (class-level retrieval), else ``None``."""
    return collected.labels if bool((collected.labels >= 0).any()) else None


def retrieval_report(
    collected: CollectedEmbeddings,
    pairs: Sequence[tuple[str, str]],
    ks: Sequence[int],
) -> dict[str, float]:
    """``{level}/{metric}/{query}->{gallery}`` of every pair in both directions: instance
    level, and class level when the records have labels.

    Example:
        >>> collected = CollectedEmbeddings(["a", "b"], {"x": torch.eye(2), "y": torch.eye(2)},
        ...     {"x": torch.ones(2, dtype=torch.bool), "y": torch.ones(2, dtype=torch.bool)},
        ...     torch.tensor([3, 3]))
        >>> retrieval_report(collected, [("x", "y")], ks=(1,))["class/R@1/y->x"]
        1.0
    """
    both_ways = [way for a, b in pairs for way in ((a, b), (b, a))]
    labels = _labels_or_none(collected)
    metrics = {}
    for level in LEVELS:
        if level == "class" and labels is None:
            continue
        results = pairwise_recall(
            collected.embeddings,
            collected.present,
            both_ways,
            ks,
            labels=labels if level == "class" else None,
        )
        metrics.update(
            {
                f"{level}/{metric}/{query}->{gallery}": value
                for (query, gallery), result in results.items()
                for metric, value in result.items()
            }
        )
    return metrics


def recall_curves(
    collected: CollectedEmbeddings, pairs: Sequence[tuple[str, str]]
) -> dict[str, dict[str, Tensor]]:
    """Recall@k curves, ``{level: {"query->gallery": curve}}`` (class level with labels)."""
    labels = _labels_or_none(collected)
    curves: dict[str, dict[str, Tensor]] = {level: {} for level in LEVELS}
    for first, second in pairs:
        for query, gallery in ((first, second), (second, first)):
            rows = _both_present(collected, (query, gallery))
            if int(rows.sum()) < 2:
                continue
            x, y = collected.embeddings[query][rows], collected.embeddings[gallery][rows]
            max_k = min(CURVE_MAX_K, x.shape[0])
            curves["instance"][f"{query}->{gallery}"] = recall_curve(x, y, max_k)
            if labels is None:
                continue
            labelled = rows & (labels >= 0)
            if int(labelled.sum()) >= 2:
                ids = labels[labelled]
                curves["class"][f"{query}->{gallery}"] = recall_curve(
                    collected.embeddings[query][labelled],
                    collected.embeddings[gallery][labelled],
                    min(CURVE_MAX_K, int(labelled.sum())),
                    query_ids=ids,
                    gallery_ids=ids,
                )
    return {level: found for level, found in curves.items() if found}


def nway_report(collected: CollectedEmbeddings, ks: Sequence[int]) -> dict[str, float]:
    """Each modality retrieved from the product of all others, over fully present samples,
    at instance level and (with labels) class level: ``{level}/{metric}/*->{target}``."""
    if len(collected.embeddings) < 3:
        return {}
    labels = _labels_or_none(collected)
    metrics = {}
    for level in LEVELS:
        if level == "class" and labels is None:
            continue
        results = nway_recall(
            collected.embeddings,
            collected.present,
            ks,
            labels=labels if level == "class" else None,
        )
        metrics.update(
            {
                f"{level}/{metric}/{query}->{target}": value
                for (query, target), result in results.items()
                for metric, value in result.items()
            }
        )
    return metrics


def _default_text_modality(model: AlignmentModel) -> str | None:
    return next(iter(model.config.modalities_of_type("text")), None)


def zeroshot_report(
    model: AlignmentModel,
    collected: CollectedEmbeddings,
    classes: str | Path | Mapping[str, Any],
    query_sets: Sequence[Sequence[str]],
    text_modality: str,
    language: str | None,
    ks: Sequence[int],
    dim: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot results per set of query modalities, keyed ``"image"`` or ``"image+audio"``
    (``dim``: classified with that Matryoshka prefix of every embedding)."""
    classnames, prompts = load_classes(classes, language)
    classifier = ZeroShotClassifier(model, prompts, text_modality, classnames=classnames, dim=dim)
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


def _retrieval_rows(metrics: Mapping[str, float], columns: Sequence[str]) -> list[list[Any]]:
    """Table rows ``[direction, level, *columns]`` of the retrieval metrics, each direction's
    instance row followed by its class row."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for name, value in metrics.items():
        level, _, rest = name.partition("/")
        if level in LEVELS:
            metric, _, direction = rest.partition("/")
            found.setdefault((direction, level), {})[metric] = value
    order = sorted(found, key=lambda key: (key[0].startswith("*"), key[0], LEVELS.index(key[1])))
    return [
        [direction, level, *(found[direction, level][c] for c in columns)]
        for direction, level in order
    ]


def markdown_report(report: Mapping[str, Any], ks: Sequence[int]) -> str:
    """The report as markdown tables (retrieval, zero-shot, diagnostics, figures)."""
    metrics = report["metrics"]
    lines = [
        "# Evaluation",
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['shards']}`",
        f"- samples: {report['samples']}",
        "",
    ]
    columns = [*(f"R@{k}" for k in ks), "median_rank", "mAP", "queries"]
    rows = _retrieval_rows(metrics, columns)
    if rows:
        header = ["query -> gallery", "level", *(f"R@{k}" for k in ks), "median rank", "mAP"]
        lines += [
            "## Retrieval",
            "",
            "instance: a hit is the query's own paired item; class: any item of the query's "
            "class. `*` is the product of the other modalities (N-way).",
            "",
            *markdown_table([*header, "queries"], rows),
        ]
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
    curves: Mapping[str, Mapping[str, Tensor]],
    zeroshot: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    from mmalign.eval.plots import plot_confusion, plot_recall_curves, plot_similarity  # [plots]

    figures = []
    if curves:
        figures.append(plot_recall_curves(curves, out_dir / "recall_curves.png"))
    for first, second in pairs:
        rows = _both_present(collected, (first, second)).nonzero().squeeze(1)[:SIMILARITY_ROWS]
        if rows.numel() >= 2:
            x, y = collected.embeddings[first][rows], collected.embeddings[second][rows]
            path = out_dir / f"similarity_{first}-{second}.png"
            figures.append(
                plot_similarity(x, y, path, f"{first} vs {second}: pairs on the diagonal")
            )
    for queries, result in zeroshot.items():
        path = out_dir / f"confusion_{queries}.png"
        confusion = torch.tensor(result["confusion"])
        figures.append(
            plot_confusion(confusion, result["classnames"], path, f"zero-shot {queries}")
        )
    return [figure.name for figure in figures]


def _truncated(collected: CollectedEmbeddings, dim: int) -> CollectedEmbeddings:
    """``collected`` with the first ``dim`` coordinates of each embedding, renormalized."""
    embeddings = {name: truncate(value, dim) for name, value in collected.embeddings.items()}
    return dataclasses.replace(collected, embeddings=embeddings)


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
    dim: int | None = None,
) -> dict[str, Any]:
    """Evaluate a model (object, model directory or run directory) on shards; write the report.

    ``modalities`` default to all of the model's; ``retrieval_pairs`` to every pair of them.
    With ``classes`` (a classes.json path or dict), zero-shot classification encodes the class
    prompts with ``text_modality`` (default: the model's first text tower) and classifies
    each of ``zeroshot_modalities`` (default: every other modality) alone and, when there are
    several, all of them together. ``dim`` evaluates the first ``dim`` coordinates of every
    embedding, renormalized (a Matryoshka prefix, as ``export --dim``). Returns the report that
    ``eval.json`` holds.

    Example:
        >>> run_eval(model, "val-000000.tar", "out")["samples"]  # doctest: +SKIP
        180
    """
    model_source = None if isinstance(model_or_run_dir, torch.nn.Module) else model_or_run_dir
    out_dir = check_output(out_dir, REPORT, [] if model_source is None else [model_source])
    model = load_model(model_or_run_dir)
    modalities = list(modalities or model.modalities)
    check_modalities(model, modalities, "--modalities")
    collected = collect_embeddings(
        model,
        shards,
        modalities,
        fields=fields,
        run_dir=model_source,
        batch_size=batch_size,
        workers=workers,
        label_field=label_field,
        max_samples=max_samples,
    )
    if dim is not None:
        check_prefix(dim, model.dim, model.config.matryoshka)
        collected = _truncated(collected, dim)
    pairs = list(retrieval_pairs or itertools.combinations(modalities, 2))
    metrics = retrieval_report(collected, pairs, ks)
    if model.objective.scores_jointly:
        metrics.update(nway_report(collected, ks))
    metrics.update(embedding_diagnostics(collected.embeddings, present=collected.present))
    for prefix_dim in [] if dim else (model.config.matryoshka or [])[:-1]:  # trained prefixes
        prefix = retrieval_report(_truncated(collected, prefix_dim), pairs, ks)
        metrics.update({f"dim{prefix_dim}/{name}": value for name, value in prefix.items()})
    zeroshot: dict[str, dict[str, Any]] = {}
    if classes is not None:
        text = check_text_modality(model, text_modality or _default_text_modality(model))
        if text not in modalities:
            raise ConfigError(
                f"zero-shot encodes the class prompts with {text!r}, which is not among the "
                f"evaluated modalities (--modalities); add it: {','.join([*modalities, text])}"
            )
        queries = list(zeroshot_modalities or [m for m in modalities if m != text])
        query_sets = [[m] for m in queries] + ([queries] if len(queries) > 1 else [])
        zeroshot = zeroshot_report(
            model, collected, classes, query_sets, text, language, (1, 5), dim=dim
        )
        for name, result in zeroshot.items():
            metrics.update({f"zeroshot/{name}/{k}": v for k, v in result["metrics"].items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(out_dir, "report directory", "--out")  # no report written through a link
    report = {
        "model": str(model_source) if model_source is not None else "<in-memory model>",
        "shards": shards if isinstance(shards, str) else list(shards),
        "samples": len(collected.keys),
        "dim": dim or model.dim,
        "metrics": metrics,
        "zeroshot": zeroshot,
        "figures": (
            _write_figures(out_dir, collected, pairs, recall_curves(collected, pairs), zeroshot)
            if plots
            else []
        ),
    }
    write_json(out_dir / "eval.json", report, sort_keys=False)  # a NaN metric: null
    write_text(out_dir / "eval.md", markdown_report(report, ks))
    record_output(out_dir, REPORT)
    return report
