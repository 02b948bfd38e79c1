"""The demo: build the digit datasets, train three models, evaluate, index, search, report.

``run_demo`` (``mmalign demo``; ``make demo`` installs first) does, in order:

1. builds the ``digits`` and ``digits-sum`` shards with :mod:`mmalign.demo.data` (skipped
   when they are already there);
2. trains a four-modality model (image, text, audio, graph) on ``digits`` with
   ``mmalign/demo/configs/demo_digits.yaml``;
3. evaluates it: zero-shot image classification from the class prompts of every language of
   ``classes.json``, class-level audio->image and graph->text retrieval (a hit is any item of
   the query's class), a confusion matrix and an image-text similarity matrix;
4. trains ``digits-sum`` with Symile and with CLIP (``demo_digits_sum_*.yaml``) and
   classifies the image's digit zero-shot from caption + tone, with reference training images
   as the class candidates: Symile scores by the multilinear inner product, CLIP by the sum
   of pairwise similarities;
5. exports the test images' embeddings, builds a FAISS index and searches it with a caption
   and with a tone written to a ``.wav`` file;
6. writes ``REPORT.md`` in ``out_dir`` (every figure, the wall and CPU times, the targets).

Each call retrains from scratch (the demo's own run directories in ``out_dir`` are replaced)
unless ``reuse=True``, which keeps finished runs and resumes interrupted ones.

Example:
    >>> run_demo("data/demo", "runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/REPORT.md')
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import soundfile
import torch

from mmalign.demo.data import make_demo
from mmalign.config import Config, ConfigError, load_config
from mmalign.data.records import iterate_records
from mmalign.eval.loading import CollectedEmbeddings, collect_embeddings
from mmalign.eval.plots import plot_confusion, plot_similarity
from mmalign.eval.retrieval import retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier, evaluate_zeroshot, load_classes
from mmalign.export.writer import build_index, export_embeddings, search
from mmalign.model import AlignmentModel

CONFIGS = {
    "digits": "demo_digits.yaml",
    "digits-sum-symile": "demo_digits_sum_symile.yaml",
    "digits-sum-clip": "demo_digits_sum_clip.yaml",
}
"""Run name (its directory in ``out_dir``) -> config file in the configs directory."""
DATASET = {"digits": "digits", "digits-sum-symile": "digits-sum", "digits-sum-clip": "digits-sum"}
LANGUAGES = ("en", "fr", "de", "es")
PRETRAINED_TOWERS = "open_clip_image_text.safetensors"
"""The digits model's image and text towers as an open_clip checkpoint, written into the
digits run directory; the digits-sum configs' tower ``checkpoint:`` fields load it."""
RETRIEVAL_PAIRS = (("audio", "image"), ("graph", "text"), ("image", "text"), ("text", "image"))
REFERENCES_PER_CLASS = 8
"""Training images per class averaged into the digits-sum zero-shot candidates."""
SEARCH_K = 5
TARGETS = {
    "zero-shot image accuracy, English prompts (digits)": ("zeroshot_en", ">=", 0.90),
    "audio->image class-level R@1 (digits)": ("audio_image_r1", ">=", 0.90),
    "Symile zero-shot accuracy, caption + tone -> image (digits-sum)": ("symile", ">=", 0.60),
    "CLIP zero-shot accuracy, caption + tone -> image (digits-sum)": ("clip", "<=", 0.15),
}
QUICK_DATA = {"limit": 30, "variants": 2}
"""``quick=True``: at most 30 source images per split, two records each."""
QUICK_OVERRIDES = {
    "train.steps": 2,
    "train.warmup": 0,
    "train.log_every": 1,
    "train.tensorboard": False,
    "data.batch_size": 8,
    "data.workers": 0,
    "data.shuffle_buffer": 16,
    "eval.every": 0,
    "eval.max_samples": 16,
}


def default_configs_dir() -> Path:
    """The demo configs shipped inside the package (``mmalign/demo/configs/``)."""
    return Path(__file__).resolve().parent / "configs"


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (data workers, builders)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Timings:
    """Wall and CPU seconds of each named demo step."""

    steps: dict[str, tuple[float, float]] = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self.steps[name] = (time.perf_counter() - wall, _cpu_seconds() - cpu)

    def total(self) -> tuple[float, float]:
        walls, cpus = zip(*self.steps.values()) if self.steps else ((0.0,), (0.0,))
        return sum(walls), sum(cpus)


@dataclass
class Run:
    """A trained demo model with its run directory, config and training figures."""

    name: str
    directory: Path
    config: Config
    steps: int
    final_loss: float | None
    model: AlignmentModel


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _split_shards(dataset_dir: Path, split: str) -> list[str]:
    """The shard files of one split, as ``make_demo`` lists them in ``summary.json``."""
    summary = json.loads((dataset_dir / "summary.json").read_text())
    return [str(dataset_dir / shard) for shard in summary["splits"][split]["shards"]]


def prepare_data(data_dir: Path, quick: bool) -> dict[str, Path]:
    """Build (or find complete) ``digits`` and ``digits-sum`` under ``data_dir``."""
    options = QUICK_DATA if quick else {}
    return make_demo(data_dir, **options)


def run_config(
    name: str, configs_dir: Path, dataset_dir: Path, out_dir: Path, quick: bool
) -> dict[str, Any]:
    """The config of one demo run with its data paths and output pointed at this demo."""
    path = configs_dir / CONFIGS[name]
    if not path.is_file():
        raise ConfigError(
            f"demo config {path} does not exist; run the demo from a checkout of mmalign or "
            "pass configs_dir (--configs DIR) pointing at its configs/ directory"
        )
    config = load_config(path).to_dict()
    data = config["data"]
    for split in ("train", "val", "test"):
        if split != "val" or data.get("val"):
            data[split] = _split_shards(dataset_dir, split)
    data["classes"] = str(dataset_dir / "classes.json")
    config["train"]["output"] = str(out_dir / name)
    for tower in config["model"]["towers"].values():
        if tower.get("checkpoint"):
            tower["checkpoint"] = str(out_dir / "digits" / PRETRAINED_TOWERS)
    if quick:
        for key, value in QUICK_OVERRIDES.items():
            section, option = key.split(".")
            config[section][option] = value
    return config


def train_run(
    name: str, configs_dir: Path, dataset_dir: Path, out_dir: Path, quick: bool, reuse: bool
) -> Run:
    """Train one demo model (replacing an earlier run unless ``reuse``)."""
    from mmalign.training import train

    config = run_config(name, configs_dir, dataset_dir, out_dir, quick)
    directory = out_dir / name
    if not reuse and directory.exists():
        shutil.rmtree(directory)
    result = train(config, resume=reuse)
    gc.collect()  # reaps the run's data-loader workers, so their CPU time is counted
    model = AlignmentModel.from_pretrained(result.model_dir).eval()
    return Run(name, directory, load_config(config), result.steps, result.final_loss, model)


def export_open_clip_towers(model: AlignmentModel, path: Path) -> Path:
    """Write the image and text towers as one open_clip-style checkpoint: the image tower's
    ``visual.*`` weights and the text transformer's weights (as in open_clip's CLIP), which
    the ``checkpoint:`` of an image or a text tower of the same architecture loads."""
    state = dict(model.towers["image"].state_dict())
    text = model.towers["text"].state_dict()
    state.update({name.removeprefix("encoder.module."): value for name, value in text.items()})
    safetensors.torch.save_file({name: value.contiguous() for name, value in state.items()}, path)
    return path


def embed_test_split(run: Run, modalities: Sequence[str]) -> CollectedEmbeddings:
    """Embeddings and labels of the run's test split."""
    data = run.config.data
    return collect_embeddings(
        run.model,
        data.test,
        list(modalities),
        fields=data.fields,
        label_field="cls",
        batch_size=256,
    )


def zeroshot_by_language(run: Run, collected: CollectedEmbeddings) -> dict[str, dict[str, Any]]:
    """Zero-shot image classification with each language's class prompts."""
    results = {}
    for language in LANGUAGES:
        classnames, prompts = load_classes(run.config.data.classes, language)
        classifier = ZeroShotClassifier(run.model, prompts, "text", classnames=classnames)
        results[language] = evaluate_zeroshot(classifier, collected, ["image"], ks=(1, 5))
    return results


def class_retrieval(collected: CollectedEmbeddings) -> dict[str, dict[str, float]]:
    """Class-level retrieval (relevant = same class) for :data:`RETRIEVAL_PAIRS`."""
    labels = collected.labels
    results = {}
    for query, gallery in RETRIEVAL_PAIRS:
        metrics = retrieval_metrics(
            collected.embeddings[query],
            collected.embeddings[gallery],
            labels,
            labels,
            ks=(1, 5, 10),
        )
        results[f"{query}->{gallery}"] = {
            name.removeprefix("q2g/"): value
            for name, value in metrics.items()
            if name.startswith("q2g/")
        }
    return results


def similarity_rows(labels: torch.Tensor, per_class: int = 4) -> torch.Tensor:
    """Row indices of the first ``per_class`` samples of each class, grouped by class."""
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


def reference_images(shards: Sequence[str], per_class: int, classes: int = 10) -> list[list]:
    """The first ``per_class`` training images of each class (zero-shot candidates)."""
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
    """Zero-shot accuracy of the image's digit from caption + tone (digits-sum)."""
    references = reference_images(run.config.data.train, REFERENCES_PER_CLASS)
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
    """Export test image embeddings, index them, search with a caption and a .wav tone."""
    export_dir = out_dir / "embeddings"
    shutil.rmtree(export_dir, ignore_errors=True)
    data = run.config.data
    manifest = export_embeddings(
        run.model,
        data.test,
        ["image"],
        export_dir,
        fields=data.fields,
        metadata_fields=["cls"],
        progress=False,
    )
    index_path = build_index(export_dir, "image")
    classnames, _ = load_classes(data.classes, "en")
    text_query = f"the digit {classnames[digit]}"
    waveform, sample_rate = first_test_clip(data.test, digit)
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


def _print_hits(search_results: dict[str, Any]) -> None:
    digit = search_results["digit"]
    for modality, found in search_results["searches"].items():
        print(f"search image index with {modality} query {found['query']!r} (digit {digit}):")
        for hit in found["hits"]:
            print(f"  {hit['rank']}. {hit['key']}  class {hit['cls']}  score {hit['score']:.3f}")


def evaluate_digits(run: Run, out_dir: Path) -> dict[str, Any]:
    """Zero-shot per language, class-level retrieval and the figures of the digits model."""
    collected = embed_test_split(run, run.model.modalities)
    zeroshot = zeroshot_by_language(run, collected)
    retrieval = class_retrieval(collected)
    figures = digits_figures(out_dir, collected, zeroshot)
    for language, result in zeroshot.items():
        print(f"zero-shot image accuracy, {language} prompts: {result['metrics']['top1']:.1%}")
    for pair, metrics in retrieval.items():
        print(f"{pair} class-level R@1 {metrics['R@1']:.1%}")
    return {
        "samples": len(collected.keys),
        "zeroshot": zeroshot,
        "retrieval": retrieval,
        "figures": figures,
    }


# ------------------------------------------------------------------------------------ report


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _link(out_dir: Path, path: Path, text: str, image: bool = False) -> str:
    """A markdown link relative to ``out_dir`` (``path`` must exist)."""
    relative = os.path.relpath(path, out_dir)
    return f"{'!' if image else ''}[{text}]({relative})"


def measured_targets(results: dict[str, Any]) -> dict[str, float]:
    """The figures the demo's targets are about."""
    digits = results["digits"]
    return {
        "zeroshot_en": digits["zeroshot"]["en"]["metrics"]["top1"],
        "audio_image_r1": digits["retrieval"]["audio->image"]["R@1"],
        "symile": results["digits-sum-symile"]["metrics"]["top1"],
        "clip": results["digits-sum-clip"]["metrics"]["top1"],
    }


def _targets_section(results: dict[str, Any], quick: bool) -> list[str]:
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
    return ["## Targets", "", *note, *_table(["check", "measured", "target", "met"], rows)]


def _training_section(out_dir: Path, runs: dict[str, Run], timings: Timings) -> list[str]:
    rows = []
    for name, run in runs.items():
        wall, cpu = timings.steps[f"train {name}"]
        loss = "-" if run.final_loss is None else f"{run.final_loss:.3f}"
        curves = [
            _link(out_dir, run.directory / png, png.removesuffix(".png"))
            for png in ("loss.png", "temperature.png", "validation.png")
            if (run.directory / png).is_file()
        ]
        rows.append(
            [
                name,
                f"`{CONFIGS[name]}`",
                run.config.model.objective.name,
                run.steps,
                run.config.data.batch_size,
                loss,
                f"{wall:.0f}",
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
    return ["## Training", "", *_table(header, rows)]


def _digits_section(out_dir: Path, digits: dict[str, Any]) -> list[str]:
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
        *_table(["language", "top-1", "top-5", "balanced accuracy"], zeroshot_rows),
        "Class-level retrieval on the test split (a hit is any gallery item of the query's class):",
        "",
        *_table(["query -> gallery", "R@1", "R@5", "R@10", "mAP"], retrieval_rows),
        _link(out_dir, figures["confusion"], "confusion matrix (English prompts)", image=True),
        _link(out_dir, figures["similarity"], "image-text similarity matrix", image=True),
        "",
    ]


def _pretrained_note(run: Run) -> str:
    """Which towers of a run started from a checkpoint (the digits model's)."""
    loaded = [name for name, tower in run.config.model.towers.items() if tower.get("checkpoint")]
    if not loaded:
        return "All towers start from random weights."
    fresh = [name for name in run.config.model.towers if name not in loaded]
    return (
        f"Both models start their {' and '.join(loaded)} towers from the digits model "
        f"(`digits/{PRETRAINED_TOWERS}`), the {' and '.join(fresh) or 'other'} tower(s) "
        "from random weights; only the objective differs."
    )


def _sum_section(results: dict[str, Any], runs: dict[str, Run]) -> list[str]:
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
        + _pretrained_note(runs["digits-sum-symile"]),
        "",
        *_table(["objective", "scoring rule", "test samples", "top-1", "top-5", "chance"], rows),
    ]


def _search_section(out_dir: Path, found: dict[str, Any]) -> list[str]:
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
            *_table(["rank", "key", "class", "score"], rows),
        ]
    return lines


def _timings_section(timings: Timings, context: dict[str, Any]) -> list[str]:
    rows = [[name, f"{wall:.1f}", f"{cpu:.1f}"] for name, (wall, cpu) in timings.steps.items()]
    wall, cpu = timings.total()
    rows.append(["**total (without install)**", f"{wall:.1f}", f"{cpu:.1f}"])
    return [
        "## Timings",
        "",
        f"{context['platform']}; torch threads {context['threads']}. CPU time adds this "
        "process and its finished child processes (data workers, dataset builders).",
        "",
        *_table(["step", "wall s", "CPU s"], rows),
    ]


def write_report(
    out_dir: Path,
    runs: dict[str, Run],
    results: dict[str, Any],
    timings: Timings,
    context: dict[str, Any],
) -> Path:
    """Write ``out_dir/REPORT.md`` from the demo's results; returns its path."""
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
        *_sum_section(results, runs),
        *_search_section(out_dir, results["search"]),
        *_timings_section(timings, context),
    ]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _threads(requested: int | None, workers: int) -> int:
    """Torch threads: ``requested``, else the cores left after the data workers (>= 1)."""
    if requested is not None:
        return max(1, requested)
    return max(1, (os.cpu_count() or 1) - workers)


def run_demo(
    data_dir: str | Path = "data/demo",
    out_dir: str | Path = "runs/demo",
    quick: bool = False,
    *,
    configs_dir: str | Path | None = None,
    reuse: bool = False,
    threads: int | None = None,
) -> Path:
    """Run the whole demo (see the module docstring); returns the path of ``REPORT.md``.

    ``quick`` runs everything at a tiny scale (little data, a few steps: a smoke test, not
    meaningful numbers). ``configs_dir`` holds the three demo configs (default: the checkout's
    ``configs/``). ``reuse`` keeps finished runs in ``out_dir`` instead of retraining.
    ``threads`` sets torch's intra-op threads (default: the CPU cores minus the data workers).

    Example:
        >>> run_demo("data/demo", "runs/demo", quick=True)  # doctest: +SKIP
        PosixPath('runs/demo/REPORT.md')
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    configs_dir = Path(configs_dir) if configs_dir is not None else default_configs_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    previous_threads = torch.get_num_threads()
    workers = 0 if quick else load_config(configs_dir / CONFIGS["digits"]).data.workers
    torch.set_num_threads(_threads(threads, workers))
    try:
        _say(f"[1/6] demo data in {data_dir}")
        with timings.measure("data"):
            datasets = prepare_data(data_dir, quick)
        runs: dict[str, Run] = {}
        results: dict[str, Any] = {}
        _say("[2/6] training digits: image + text + audio + graph (CLIP objective)")
        with timings.measure("train digits"):
            runs["digits"] = train_run(
                "digits", configs_dir, datasets["digits"], out_dir, quick, reuse
            )
            export_open_clip_towers(runs["digits"].model, out_dir / "digits" / PRETRAINED_TOWERS)
        _say("[3/6] evaluating digits on the test split")
        with timings.measure("evaluate digits"):
            results["digits"] = evaluate_digits(runs["digits"], out_dir)
        for name in ("digits-sum-symile", "digits-sum-clip"):
            objective = name.rsplit("-", 1)[1]
            _say(f"[4/6] training digits-sum with {objective} and classifying zero-shot")
            with timings.measure(f"train {name}"):
                runs[name] = train_run(
                    name, configs_dir, datasets[DATASET[name]], out_dir, quick, reuse
                )
            with timings.measure(f"evaluate {name}"):
                results[name] = sum_zeroshot(runs[name])
            print(f"{name}: zero-shot top-1 {results[name]['metrics']['top1']:.1%} (chance 10%)")
        _say("[5/6] exporting test image embeddings, FAISS index, search")
        with timings.measure("export + index + search"):
            results["search"] = index_and_search(runs["digits"], out_dir)
        _print_hits(results["search"])
        _say("[6/6] report")
        context = {
            "data_dir": data_dir,
            "out_dir": out_dir,
            "configs_dir": configs_dir,
            "quick": quick,
            "reuse": reuse,
            "threads": torch.get_num_threads(),
            "platform": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}",
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        }
        report = write_report(out_dir, runs, results, timings, context)
    finally:
        torch.set_num_threads(previous_threads)
    print(f"report: {report}")
    return report
