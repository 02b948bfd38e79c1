"""Training throughput: mmalign vs open_clip's training script on the same CLIP and shards.

The same image-text model trains for the same steps on the same synthetic WebDataset shards
(coloured shapes with captions), once with ``python -m open_clip_train.main`` and once with
``python -m mmalign train`` (plus mmalign variant rows), each in its own process, on the CPU,
fp32, one process, with equal settings: AdamW (same lr, betas, eps, weight decay), warmup +
cosine, gradient clipping at norm 1, the same DataLoader workers and intra-op threads.
``--size`` picks the model (:data:`SIZES`):

- ``tiny``: an open_clip ViT (image 32, patch 8, width 64, 2 layers) + text transformer
  (width 64, 2 layers, context 32), embed_dim 64, 3.4M parameters; batch 64, 50 steps;
- ``b32``: open_clip's ViT-B-32 at 224 px + its text transformer (context 77), 151M
  parameters, random init (nothing downloads); batch 32, 2 warm-up + 10 measured steps.

Reported, per row: samples/s over the logged intervals after the warm-up steps (best of
``--repeats`` interleaved runs), the child's peak RSS (``ru_maxrss``), wall and CPU seconds
of a whole run (CPU time is far less disturbed than wall time by other jobs), with
``--short-steps`` the marginal CPU time per sample (CPU seconds of the run minus those
of a shorter one, over the extra samples: start-up cancels), ratios to open_clip_train, and
mmalign's time per step split into data / forward / loss / backward / optimizer.

Variant rows (:data:`VARIANTS`, ``--variants``; ``--mmalign-set KEY=VALUE`` adds a custom
one) train mmalign with ``--set`` overrides; a key mmalign does not know makes the row
"not available" (mmalign's one-line config error), not a crash.

    python benchmarks/train_throughput.py --size b32 --repeats 2 \\
        --variants checkpointing compile lora [--mmalign-set KEY=VALUE ...] \\
        --open-clip-pythonpath DIR   # pandas + webdataset==0.2.86 for open_clip_train
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from trainer_runs import (
    Measured,
    Model,
    RunFailed,
    Settings,
    mmalign_config,
    run_mmalign,
    run_open_clip,
    write_shards,
)

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIZES: dict[str, tuple[Model, Settings, int]] = {
    "tiny": (
        Model("bench-tiny-clip", 64, TINY, image_px=40),
        Settings(batch_size=64, steps=50, warmup_steps=10, log_every=10),
        10,
    ),
    "b32": (
        Model("ViT-B-32", 512, None, image_px=256),
        Settings(batch_size=32, steps=12, warmup_steps=2, log_every=1),
        0,
    ),
}
"""Model, default settings and default ``--short-steps`` (0: no marginal CPU) of a size."""

LORA = "{r: 8, alpha: 16, dropout: 0.0}"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "checkpointing": ("mmalign + gradient checkpointing", ["train.gradient_checkpointing=true"]),
    "compile": ("mmalign + compile", ["train.compile=true"]),
    "lora": (
        "mmalign + LoRA r=8 on both towers",
        [f"model.towers.image.lora={LORA}", f"model.towers.text.lora={LORA}"],
    ),
    "release-memory": ("mmalign, host_memory: release", ["train.host_memory=release"]),
    "checkpointing-keep": (
        "mmalign + gradient checkpointing, host_memory: keep",
        ["train.gradient_checkpointing=true", "train.host_memory=keep"],
    ),
}
"""mmalign variant rows: name -> (label, ``--set`` overrides)."""
OPEN_CLIP_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "open-clip-checkpointing": ("open_clip_train --grad-checkpointing", ["--grad-checkpointing"]),
}
"""open_clip_train variant rows: name -> (label, extra arguments)."""

OPEN_CLIP = "open_clip_train"
MMALIGN = "mmalign"


def parameter_counts(model: Model, settings: Settings, out: Path) -> dict[str, int]:
    """Parameters of the model as open_clip and as mmalign build it (on the meta device)."""
    import open_clip
    import torch

    from mmalign.config import load_config
    from mmalign.model import AlignmentModel

    if model.model_cfg is not None:
        path = out / f"{model.name}.json"
        path.write_text(json.dumps(model.model_cfg))
        open_clip.add_model_config(path)
    config = load_config(mmalign_config(model, settings, "unused.tar", Path("unused")))
    with torch.device("meta"):
        counted = {
            OPEN_CLIP: open_clip.create_model(model.name, device="meta"),
            MMALIGN: AlignmentModel.from_config(config.model),
        }
    return {name: sum(p.numel() for p in built.parameters()) for name, built in counted.items()}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def measure(
    label: str, trainer: str, extra: list[str], args: argparse.Namespace, model: Model
) -> dict[str, Any]:
    """One run of a row of ``trainer`` (open_clip_train: ``extra`` arguments; mmalign:
    ``extra`` ``--set`` overrides), with the shorter run for the marginal CPU time when
    ``--short-steps``; its figures or why it failed."""

    def once(steps: int) -> Measured:
        settings = replace(args.settings, steps=steps)
        if trainer == OPEN_CLIP:
            path = args.open_clip_pythonpath
            return run_open_clip(args.out, args.shards, model, settings, path, extra)
        return run_mmalign(args.out, args.shards, model, settings, extra)

    before = loadavg()
    try:
        short = once(args.short_steps) if args.short_steps else None
        long = once(args.settings.steps)
    except RunFailed as error:
        return {"label": label, "unavailable" if error.unavailable else "error": str(error)}
    result = {"label": label, **asdict(long), "loadavg": [before, loadavg()]}
    if short is not None:
        extra = (args.settings.steps - args.short_steps) * args.settings.batch_size
        result["cpu_ms_per_sample"] = 1000 * (long.cpu_s - short.cpu_s) / extra
    return result


def summarize(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row: best samples/s, largest peak RSS, median wall and marginal CPU over the
    repeats, and ratios to open_clip_train's row."""
    rows = []
    for index, first in enumerate(runs[0]):
        done = [run[index] for run in runs if "samples_per_s" in run[index]]
        row: dict[str, Any] = {"label": first["label"], "runs": len(done)}
        if not done:
            row["not_available"] = first.get("unavailable") or first.get("error")
            rows.append(row)
            continue
        rates = [r["samples_per_s"] for r in done if r["samples_per_s"] is not None]
        row["samples_per_s"] = max(rates) if rates else None
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in done)
        row["wall_s"] = float(np.median([r["wall_s"] for r in done]))
        row["cpu_s"] = float(np.median([r["cpu_s"] for r in done]))
        cpu = [r["cpu_ms_per_sample"] for r in done if "cpu_ms_per_sample" in r]
        row["cpu_ms_per_sample"] = float(np.median(cpu)) if cpu else None
        row["step_split_s"] = done[int(np.argmax([r["samples_per_s"] or 0 for r in done]))].get(
            "step_split_s"
        )
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("samples_per_s", "peak_rss_mib", "cpu_s", "cpu_ms_per_sample"):
            if row.get(key) and base.get(key):
                row[f"{key}_ratio"] = row[key] / base[key]
    return rows


def _cell(value: float | None, digits: int, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def table(rows: list[dict[str, Any]], repeats: int) -> str:
    """The summary as a Markdown table."""
    lines = [
        f"| trainer | samples/s (best of {repeats}) | / open_clip | peak RSS MiB | / open_clip "
        "| wall s per run | CPU s per run | / open_clip | CPU ms/sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "not_available" in row:
            why = row["not_available"].partition(": ")[2].partition(" (log: ")[0]
            lines.append(f"| {row['label']} | not available ({why}) | - | - | - | - | - | - | - |")
            continue
        cells = [
            row["label"],
            _cell(row["samples_per_s"], 2),
            _cell(row.get("samples_per_s_ratio"), 2, "x"),
            _cell(row["peak_rss_mib"], 0),
            _cell(row.get("peak_rss_mib_ratio"), 2, "x"),
            _cell(row["wall_s"], 0),
            _cell(row["cpu_s"], 0),
            _cell(row.get("cpu_s_ratio"), 2, "x"),
            _cell(row["cpu_ms_per_sample"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, help="steps per run (default: the size's)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of samples/s")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--short-steps", type=int, help="a shorter run whose CPU time is subtracted (0: none)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of each trainer: on a shared machine idle OpenMP threads spin "
        "and turn wall and CPU time into noise; one thread each keeps the comparison stable",
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best kept")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS | OPEN_CLIP_VARIANTS),
        default=[],
        help=f"variant rows, of {', '.join(VARIANTS | OPEN_CLIP_VARIANTS)} (default: none)",
    )
    parser.add_argument(
        "--mmalign-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a custom mmalign row trained with these --set overrides; repeatable",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmalign_train_throughput"))
    parser.add_argument(
        "--table-from",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the table of a (possibly interrupted) run's results.json and exit",
    )
    parser.add_argument(
        "--open-clip-pythonpath",
        help="extra PYTHONPATH for open_clip_train only: it imports pandas and needs "
        "webdataset<=0.2.86 (its `training` extra); mmalign uses webdataset 1.x. Make one with "
        "pip install --target DIR pandas 'webdataset==0.2.86' --no-deps (+ pandas' deps)",
    )
    args = parser.parse_args(argv)
    model, settings, short_steps = SIZES[args.size]
    given = {
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "log_every": args.log_every,
        "batch_size": args.batch_size,
    }
    args.settings = replace(
        settings,
        workers=args.workers,
        threads=args.threads,
        **{key: value for key, value in given.items() if value is not None},
    )
    args.short_steps = short_steps if args.short_steps is None else args.short_steps
    args.model = model
    return args


def print_table_from(path: Path) -> int:
    """The table of the complete repeats of a results.json (written after every run)."""
    results = json.loads(path.read_text())
    runs = [run for run in results["runs"] if len(run) == len(results["runs"][0])]
    print(f"loadavg before: {results['loadavg_before']}; runs: {len(runs)}")
    print(table(summarize(runs), len(runs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from:
        return print_table_from(args.table_from)
    model = args.model
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    results: dict[str, Any] = {
        "settings": asdict(args.settings) | {"size": args.size, "model": model.name},
        "short_steps": args.short_steps,
        "loadavg_before": loadavg(),
        "parameters": parameter_counts(model, args.settings, args.out),
    }
    print(f"parameters: {results['parameters']}", flush=True)
    args.shards = write_shards(args.out / "data", samples=2048, side=model.image_px)
    rows: list[tuple[str, str, list[str]]] = [(OPEN_CLIP, OPEN_CLIP, []), (MMALIGN, MMALIGN, [])]
    for name in args.variants:
        label, extra = (VARIANTS | OPEN_CLIP_VARIANTS)[name]
        rows.append((label, OPEN_CLIP if name in OPEN_CLIP_VARIANTS else MMALIGN, extra))
    if args.mmalign_set:
        label = f"mmalign --set {' --set '.join(args.mmalign_set)}"
        rows.append((label, MMALIGN, args.mmalign_set))
    results["runs"] = runs = []
    for repeat in range(args.repeats):  # interleaved, so every row sees similar machine load
        runs.append([])
        for label, trainer, extra in rows:
            runs[-1].append(measure(label, trainer, extra, args, model))
            print(f"repeat {repeat + 1}: {json.dumps(runs[-1][-1])}", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    results["loadavg_after"] = loadavg()
    results["rows"] = summarize(runs)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["rows"], indent=1))
    print(f"loadavg before: {results['loadavg_before']}; after: {results['loadavg_after']}")
    print(table(results["rows"], args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
