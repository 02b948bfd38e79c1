"""The demo: build the digit datasets, train four models, evaluate, index, search, report.

``run_demo`` (``mmalign demo``; ``make demo`` installs first) does, in order:

1. builds the ``digits`` and ``digits-sum`` shards with :mod:`mmalign.demo.data` (skipped
   when they are already there);
2. trains a four-modality model (image, text, audio, graph) on ``digits`` with the
   package's ``configs/demo_digits.yaml`` (:func:`default_configs_dir`);
3. evaluates it (:mod:`mmalign.demo.results`): zero-shot image classification from the
   class prompts of every language of ``classes.json``, class-level audio->image and
   graph->text retrieval (a hit is any item of the query's class), the zero-shot and
   text->image figures at the smallest Matryoshka prefix (``model.matryoshka``: the first 16
   of 64 dimensions), a confusion matrix and an image-text similarity matrix; then trains
   one model of all six modalities (image, text, audio, graph, video, pen trajectory;
   ``demo_digits_motion.yaml``) on the same records and measures zero-shot image, graph,
   video and trajectory classification and class-level retrieval (audio->video ...);
4. trains ``digits-sum`` with Symile and with CLIP (``demo_digits_sum_*.yaml``) and
   classifies the image's digit zero-shot from caption + tone, with reference training images
   as the class candidates: Symile scores by the multilinear inner product, CLIP by the sum
   of pairwise similarities;
5. exports the test images' embeddings, builds a FAISS index and searches it with a caption
   and with a tone written to a ``.wav`` file;
6. writes ``REPORT.md`` in ``out_dir`` (:mod:`mmalign.demo.report`: every figure, the wall
   and CPU times, the targets).

Nothing is read from a checkout: the configs are package files, the data is built from
scikit-learn's bundled digits, so an installed wheel runs the demo from any directory.

Each call retrains from scratch (the demo's own run directories in ``out_dir`` are replaced)
unless ``reuse=True``, which keeps finished runs and resumes interrupted ones; a reused run
keeps the training time recorded in ``out_dir/timings.json`` and the final loss of its
``metrics.jsonl``.

Example:
    >>> run_demo("data/demo", "runs/demo", quick=True)  # doctest: +SKIP
    PosixPath('runs/demo/REPORT.md')
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, load_config
from mmalign.convert import to_open_clip
from mmalign.demo.data import make_demo
from mmalign.demo.report import write_report
from mmalign.demo.results import (
    evaluate_digits,
    evaluate_motion,
    index_and_search,
    print_hits,
    sum_zeroshot,
)
from mmalign.demo.runs import Run
from mmalign.demo.timings import Timings
from mmalign.model import AlignmentModel
from mmalign.output_owner import check_output

CONFIGS = {
    "digits": "demo_digits.yaml",
    "digits-motion": "demo_digits_motion.yaml",
    "digits-sum-symile": "demo_digits_sum_symile.yaml",
    "digits-sum-clip": "demo_digits_sum_clip.yaml",
}
"""Run name (its directory in ``out_dir``) -> config file in the configs directory."""
DATASET = {
    "digits": "digits",
    "digits-motion": "digits",
    "digits-sum-symile": "digits-sum",
    "digits-sum-clip": "digits-sum",
}
PRETRAINED_TOWERS = "open_clip"
"""The digits model's image and text towers as an open_clip folder (``mmalign convert --to
open_clip``), written into the digits run directory; the digits-sum configs' towers load it
with ``pretrained: local-dir:...``."""
TIMINGS_FILE = "timings.json"
"""Wall and CPU seconds of each step of the last demo in ``out_dir`` (kept for ``reuse``)."""
QUICK_DATA: dict[str, Any] = {"limit": 30, "variants": 2}
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
    """The demo configs shipped inside the package (``mmalign/demo/configs/``).

    Example:
        >>> sorted(path.name for path in default_configs_dir().glob("demo_*.yaml"))[0]
        'demo_digits.yaml'
    """
    return Path(__file__).resolve().parent / "configs"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _split_shards(dataset_dir: Path, split: str) -> list[str]:
    """The shard files of one split, as ``make_demo`` lists them in ``summary.json``."""
    summary = json.loads((dataset_dir / "summary.json").read_text())
    return [str(dataset_dir / shard) for shard in summary["splits"][split]["shards"]]


def prepare_data(data_dir: Path, quick: bool) -> dict[str, Path]:
    """Build (or find complete) ``digits`` and ``digits-sum`` under ``data_dir``.

    Example:
        >>> prepare_data(Path("data/demo"), quick=True)["digits"]  # doctest: +SKIP
        PosixPath('data/demo/digits')
    """
    options = QUICK_DATA if quick else {}
    return make_demo(data_dir, **options)


def run_config(
    name: str, configs_dir: Path, dataset_dir: Path, out_dir: Path, quick: bool
) -> dict[str, Any]:
    """The config of one demo run with its data paths and output pointed at this demo.

    Example:
        >>> config = run_config("digits", default_configs_dir(), Path("data/demo/digits"),
        ...                     Path("runs/demo"), quick=True)  # doctest: +SKIP
        >>> config["train"]["output"], config["train"]["steps"]  # doctest: +SKIP
        ('runs/demo/digits', 2)
    """
    path = configs_dir / CONFIGS[name]
    if not path.is_file():
        raise ConfigError(
            f"demo config {path} does not exist; leave configs_dir (--configs DIR) unset for "
            f"the configs installed with mmalign ({default_configs_dir()}) or point it at a "
            f"directory holding {', '.join(CONFIGS.values())}"
        )
    config = load_config(path).to_dict()
    data = config["data"]
    for split in ("train", "val", "test"):
        if split != "val" or data.get("val"):
            data[split] = _split_shards(dataset_dir, split)
    data["classes"] = str(dataset_dir / "classes.json")
    config["train"]["output"] = str(out_dir / name)
    for tower in config["model"]["towers"].values():
        if tower.get("pretrained"):
            tower["pretrained"] = f"local-dir:{out_dir / 'digits' / PRETRAINED_TOWERS}"
    if quick:
        for key, value in QUICK_OVERRIDES.items():
            section, option = key.split(".")
            config[section][option] = value
    return config


def train_run(
    name: str, configs_dir: Path, dataset_dir: Path, out_dir: Path, quick: bool, reuse: bool
) -> Run:
    """Train one demo model (replacing an earlier run unless ``reuse``).

    Example:
        >>> run = train_run("digits", default_configs_dir(), Path("data/demo/digits"),
        ...                 Path("runs/demo"), quick=True, reuse=False)  # doctest: +SKIP
        >>> run.steps  # doctest: +SKIP
        2
    """
    from mmalign.training import train
    from mmalign.training.logging import METRICS_FILE, read_metrics
    from mmalign.training.run import RUN_INFO, RUN_OUTPUT

    config = run_config(name, configs_dir, dataset_dir, out_dir, quick)
    directory = out_dir / name
    if not reuse and directory.exists():
        if not (directory / RUN_INFO).is_file():  # never delete a folder that is not a run
            check_output(directory, RUN_OUTPUT)
        shutil.rmtree(directory)
    result = train(config, resume=reuse)
    gc.collect()  # reaps the run's data-loader workers, so their CPU time is counted
    model = AlignmentModel.from_pretrained(result.model_dir).eval()
    if result.already_finished:
        print(f"{name}: reusing the finished run in {directory} ({result.steps} steps)")
    final_loss = result.final_loss
    if final_loss is None:  # a reused run: its last logged training loss
        losses = [
            r["train/loss"] for r in read_metrics(directory / METRICS_FILE) if "train/loss" in r
        ]
        final_loss = losses[-1] if losses else None
    return Run(
        name,
        directory,
        CONFIGS[name],
        load_config(config),
        result.steps,
        final_loss,
        model,
        reused=result.already_finished,
    )


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
    meaningful numbers). ``configs_dir`` holds the four demo configs (default: those
    installed with the package, :func:`default_configs_dir`). ``reuse`` keeps finished runs
    in ``out_dir`` instead of retraining. ``threads`` sets torch's intra-op threads (default:
    the CPU cores minus the data workers). Relative paths are relative to the current
    directory.

    Example:
        >>> run_demo("data/demo", "runs/demo", quick=True)  # doctest: +SKIP
        PosixPath('runs/demo/REPORT.md')
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    configs_dir = Path(configs_dir) if configs_dir is not None else default_configs_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    earlier = Timings.read(out_dir / TIMINGS_FILE) if reuse else Timings()
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
            to_open_clip(runs["digits"].model, out_dir / "digits" / PRETRAINED_TOWERS)
        _say("[3/6] evaluating digits on the test split")
        with timings.measure("evaluate digits"):
            results["digits"] = evaluate_digits(runs["digits"], out_dir)
        _say("[3/6] training digits-motion: the six modalities (CLIP objective), evaluating")
        with timings.measure("train digits-motion"):
            runs["digits-motion"] = train_run(
                "digits-motion", configs_dir, datasets["digits"], out_dir, quick, reuse
            )
        with timings.measure("evaluate digits-motion"):
            results["digits-motion"] = evaluate_motion(runs["digits-motion"])
        for part, name in enumerate(("digits-sum-symile", "digits-sum-clip"), start=1):
            objective = name.rsplit("-", 1)[1]
            _say(f"[4/6] ({part}/2) training digits-sum with {objective}, classifying zero-shot")
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
        print_hits(results["search"])
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
        for name, run in runs.items():  # a reused run keeps the time of its training
            if run.reused and f"train {name}" in earlier.steps:
                timings.steps[f"train {name}"] = earlier.steps[f"train {name}"]
        timings.save(out_dir / TIMINGS_FILE)
        report = write_report(out_dir, runs, results, timings, context)
    finally:
        torch.set_num_threads(previous_threads)
    print(f"report: {report}")
    return report
