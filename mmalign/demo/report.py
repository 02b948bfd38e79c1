"""``REPORT.md`` of the demo: the targets, the trainings, every measurement, the timings.

:func:`write_report` assembles one markdown section per part of the demo from the runs
(:class:`mmalign.demo.pipeline.Run`), the results of :mod:`mmalign.demo.results` and the
step timings. Links to figures and files are relative to the report's directory.

Example:
    >>> write_report(Path("runs/demo"), runs, results, timings, context)  # doctest: +SKIP
    PosixPath('runs/demo/REPORT.md')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmalign.demo.results import REFERENCES_PER_CLASS
from mmalign.demo.runs import Run
from mmalign.demo.timings import Timings
from mmalign.eval.report import markdown_table
from mmalign.files import write_text

TARGETS = {
    "zero-shot image accuracy, English prompts (digits)": ("zeroshot_en", ">=", 0.90),
    "audio->image class-level R@1 (digits)": ("audio_image_r1", ">=", 0.90),
    "zero-shot video accuracy, English prompts (digits-motion)": ("zeroshot_video", ">=", 0.90),
    "zero-shot trajectory accuracy, English prompts (digits-motion)": (
        "zeroshot_trajectory",
        ">=",
        0.90,
    ),
    "audio->video class-level R@1 (digits-motion)": ("audio_video_r1", ">=", 0.90),
    "Symile zero-shot accuracy, caption + tone -> image (digits-sum)": ("symile", ">=", 0.60),
    "CLIP zero-shot accuracy, caption + tone -> image (digits-sum)": ("clip", "<=", 0.15),
}
"""Target label -> (key of :func:`measured_targets`, sense, threshold)."""
TRAINING_PLOTS = ("loss.png", "temperature.png", "validation.png")
"""The curves each run directory holds (:mod:`mmalign.training.curves`)."""


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _link(out_dir: Path, path: Path, text: str, image: bool = False) -> str:
    """A markdown link relative to ``out_dir`` (``path`` must exist)."""
    relative = os.path.relpath(path, out_dir)
    return f"{'!' if image else ''}[{text}]({relative})"


def measured_targets(results: dict[str, Any]) -> dict[str, float]:
    """The figures the demo's :data:`TARGETS` are about.

    Example:
        >>> measured_targets(results)["symile"]  # doctest: +SKIP
        0.998
    """
    digits, motion = results["digits"], results["digits-motion"]
    return {
        "zeroshot_en": digits["zeroshot"]["en"]["metrics"]["top1"],
        "audio_image_r1": digits["retrieval"]["audio->image"]["R@1"],
        "zeroshot_video": motion["zeroshot"]["video"]["metrics"]["top1"],
        "zeroshot_trajectory": motion["zeroshot"]["trajectory"]["metrics"]["top1"],
        "audio_video_r1": motion["retrieval"]["audio->video"]["R@1"],
        "symile": results["digits-sum-symile"]["metrics"]["top1"],
        "clip": results["digits-sum-clip"]["metrics"]["top1"],
    }


def _targets_section(results: dict[str, Any], quick: bool) -> list[str]:
    """``## Targets``: each target's measured figure, threshold and verdict."""
    measured = measured_targets(results)
    rows = []
    for label, (key, sense, threshold) in TARGETS.items():
        met = measured[key] >= threshold if sense == ">=" else measured[key] <= threshold
        verdict = "yes" if met else "no"
        rows.append([label, _percent(measured[key]), f"{sense} {_percent(threshold)}", verdict])
    note = (
        [
            "_Quick mode (a smoke test on tiny data): the figures are not meant to meet the "
            "targets._",
            "",
        ]
        if quick
        else []
    )
    return ["## Targets", "", *note, *markdown_table(["check", "measured", "target", "met"], rows)]


def _training_section(out_dir: Path, runs: dict[str, Run], timings: Timings) -> list[str]:
    """``## Training``: one row per run with its times, then each run's curves (embedded)."""
    rows, figures = [], []
    for name, run in runs.items():
        wall, cpu = timings.steps[f"train {name}"]
        loss = "-" if run.final_loss is None else f"{run.final_loss:.3f}"
        pngs = [png for png in TRAINING_PLOTS if (run.directory / png).is_file()]
        curves = [_link(out_dir, run.directory / png, png.removesuffix(".png")) for png in pngs]
        figures += [
            _link(out_dir, run.directory / png, f"{name}: {png.removesuffix('.png')}", image=True)
            for png in pngs
        ]
        reused = " (earlier run, reused)" if run.reused else ""
        rows.append(
            [
                name,
                f"`{run.config_file}`",
                run.config.model.objective.name,
                run.steps,
                run.config.data.batch_size,
                loss,
                f"{wall:.0f}{reused}",
                f"{cpu:.0f}",
                ", ".join(curves) or "-",
            ]
        )
    header = [
        "run",
        "config",
        "objective",
        "steps",
        "batch",
        "final loss",
        "wall s",
        "CPU s",
        "training curves",
    ]
    return ["## Training", "", *markdown_table(header, rows), *figures, ""]


def _prefix_lines(digits: dict[str, Any]) -> list[str]:
    """The Matryoshka line: both figures at the smallest trained prefix and at full size
    (none when the digits model was trained at full size only)."""
    prefix = digits.get("matryoshka")
    if prefix is None:
        return []
    full = prefix["prefixes"][-1]
    return [
        f"Matryoshka (`model.matryoshka: {prefix['prefixes']}`): the first {prefix['dim']} of "
        f"{full} dimensions, renormalized, give zero-shot top-1 (English) "
        f"{_percent(prefix['zeroshot_en'])} and text->image class-level R@1 "
        f"{_percent(prefix['text->image R@1'])} (all {full}: "
        f"{_percent(digits['zeroshot']['en']['metrics']['top1'])} and "
        f"{_percent(digits['retrieval']['text->image']['R@1'])}); nested prefixes against "
        "plain truncation: `docs/BENCHMARKS.md`.",
        "",
    ]


def _digits_section(out_dir: Path, digits: dict[str, Any]) -> list[str]:
    """``## digits``: zero-shot by language, class-level retrieval, the two figures."""
    zeroshot_rows = [
        [
            language,
            _percent(result["metrics"]["top1"]),
            _percent(result["metrics"]["top5"]),
            _percent(result["metrics"]["balanced_accuracy"]),
        ]
        for language, result in digits["zeroshot"].items()
    ]

    retrieval_rows = [
        [pair, _percent(m["R@1"]), _percent(m["R@5"]), _percent(m["R@10"]), f"{m['mAP']:.3f}"]
        for pair, m in digits["retrieval"].items()
    ]
    figures = digits["figures"]
    return [
        f"## digits: image, text, audio, graph ({digits['samples']} test samples)",
        "",
        "Zero-shot image classification from the class prompts of each language "
        "(`classes.json`; the prompts of one language averaged per class):",
        "",
        *markdown_table(["language", "top-1", "top-5", "balanced accuracy"], zeroshot_rows),
        "Class-level retrieval on the test split (a hit is any gallery item of the query's class):",
        "",
        *markdown_table(["query -> gallery", "R@1", "R@5", "R@10", "mAP"], retrieval_rows),
        *_prefix_lines(digits),
        _link(out_dir, figures["confusion"], "confusion matrix (English prompts)", image=True),
        _link(out_dir, figures["similarity"], "image-text similarity matrix", image=True),
        "",
    ]


def _motion_section(motion: dict[str, Any]) -> list[str]:
    """``## digits-motion``: zero-shot image, graph, video and trajectory, class-level
    retrieval."""
    zeroshot_rows = [
        [
            modality,
            _percent(result["metrics"]["top1"]),
            _percent(result["metrics"]["top5"]),
            _percent(result["metrics"]["balanced_accuracy"]),
        ]
        for modality, result in motion["zeroshot"].items()
    ]
    retrieval_rows = [
        [pair, _percent(m["R@1"]), _percent(m["R@5"]), _percent(m["R@10"]), f"{m['mAP']:.3f}"]
        for pair, m in motion["retrieval"].items()
    ]
    return [
        f"## digits-motion: image, text, audio, graph, video, trajectory "
        f"({motion['samples']} test samples)",
        "",
        "One model of all six modalities of the same records: image, caption, tone, "
        "seven-segment graph, video (6 frames of the handwritten digit moving, decoded with "
        "PyAV) and pen trajectory (2 channels), trained by a run of its own beside the "
        "four-modality digits model. Zero-shot classification from the English class prompts:",
        "",
        *markdown_table(["modality", "top-1", "top-5", "balanced accuracy"], zeroshot_rows),
        "Class-level retrieval on the test split:",
        "",
        *markdown_table(["query -> gallery", "R@1", "R@5", "R@10", "mAP"], retrieval_rows),
    ]


def _pretrained_note(out_dir: Path, run: Run) -> str:
    """Which towers of a run started from pretrained weights (the digits model's open_clip
    folder, ``pretrained: local-dir:...``, or a ``checkpoint:`` file)."""
    towers = {name: tower.model_dump() for name, tower in run.config.model.towers.items()}
    loaded = {
        name: str(tower.get("pretrained") or tower["checkpoint"]).removeprefix("local-dir:")
        for name, tower in towers.items()
        if tower.get("pretrained") or tower.get("checkpoint")
    }
    if not loaded:
        return "All towers start from random weights."
    checkpoint = os.path.relpath(next(iter(loaded.values())), out_dir)
    fresh = [name for name in towers if name not in loaded]
    return (
        f"Both models start their {' and '.join(loaded)} towers from the digits model "
        f"(`{checkpoint}`), the {' and '.join(fresh) or 'other'} tower(s) "
        "from random weights; only the objective differs."
    )


def _sum_section(out_dir: Path, results: dict[str, Any], runs: dict[str, Run]) -> list[str]:
    """``## digits-sum``: Symile against CLIP on caption + tone -> image."""
    rows = [
        [
            name.rsplit("-", 1)[1],
            results[name]["rule"],
            results[name]["samples"],
            _percent(results[name]["metrics"]["top1"]),
            _percent(results[name]["metrics"]["top5"]),
            "10.0%",
        ]
        for name in ("digits-sum-symile", "digits-sum-clip")
    ]
    return [
        "## digits-sum: Symile vs CLIP",
        "",
        "The caption names a, the tone keys b, the image shows (a + b) mod 10: every pair of "
        "modalities is independent, only the three together carry information. Each model "
        f"classifies the image's digit from caption + tone; the class candidates are "
        f"{REFERENCES_PER_CLASS} training images per digit, embeddings averaged. "
        + _pretrained_note(out_dir, runs["digits-sum-symile"]),
        "",
        *markdown_table(
            ["objective", "scoring rule", "test samples", "top-1", "top-5", "chance"], rows
        ),
    ]


def _search_section(out_dir: Path, found: dict[str, Any]) -> list[str]:
    """``## Embedding export and search``: the index and the hits of each query."""
    lines = [
        "## Embedding export and search",
        "",
        f"{found['rows']} test images exported and indexed "
        f"({_link(out_dir, found['index'], found['index'].name)}, exact inner product). "
        f"Queries for the digit {found['digit']}: a caption, and a test tone saved as "
        f"{_link(out_dir, found['wav'], found['wav'].name)}.",
        "",
    ]
    for modality, search_result in found["searches"].items():
        hits = search_result["hits"]
        precision = sum(hit["cls"] == found["digit"] for hit in hits) / max(len(hits), 1)
        rows = [[hit["rank"], f"`{hit['key']}`", hit["cls"], f"{hit['score']:.3f}"] for hit in hits]
        lines += [
            f"{modality} query `{search_result['query']}`: precision@{len(hits)} "
            f"{_percent(precision)}",
            "",
            *markdown_table(["rank", "key", "class", "score"], rows),
        ]
    return lines


def _timings_section(timings: Timings, context: dict[str, Any]) -> list[str]:
    """``## Timings``: wall and CPU seconds of every step and their total."""
    rows = [[name, f"{wall:.1f}", f"{cpu:.1f}"] for name, (wall, cpu) in timings.steps.items()]
    wall, cpu = timings.total()
    rows.append(["**total (without install)**", f"{wall:.1f}", f"{cpu:.1f}"])
    return [
        "## Timings",
        "",
        f"{context['platform']}; torch threads {context['threads']}. CPU time adds this "
        "process and its finished child processes (data workers, dataset builders).",
        "",
        *markdown_table(["step", "wall s", "CPU s"], rows),
    ]


def write_report(
    out_dir: Path,
    runs: dict[str, Run],
    results: dict[str, Any],
    timings: Timings,
    context: dict[str, Any],
) -> Path:
    """Write ``out_dir/REPORT.md`` from the demo's results; returns its path.

    ``results`` holds ``digits``, ``digits-motion``, ``digits-sum-symile``,
    ``digits-sum-clip`` and ``search`` (from :mod:`mmalign.demo.results`); ``context`` the
    ``date``, ``data_dir``,
    ``configs_dir``, ``quick``, ``reuse``, ``threads`` and ``platform`` of the run.

    Example:
        >>> write_report(Path("runs/demo"), runs, results, timings, context)  # doctest: +SKIP
        PosixPath('runs/demo/REPORT.md')
    """
    lines = [
        "# mmalign demo report",
        "",
        f"Made by `mmalign demo` on {context['date']} from the data in `{context['data_dir']}` "
        f"and the configs in `{context['configs_dir']}`"
        f"{' (quick mode)' if context['quick'] else ''}"
        f"{'; finished runs reused' if context['reuse'] else ''}.",
        "",
        *_targets_section(results, context["quick"]),
        *_training_section(out_dir, runs, timings),
        *_digits_section(out_dir, results["digits"]),
        *_motion_section(results["digits-motion"]),
        *_sum_section(out_dir, results, runs),
        *_search_section(out_dir, results["search"]),
        *_timings_section(timings, context),
    ]
    path = out_dir / "REPORT.md"
    write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
