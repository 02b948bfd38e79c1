"""Fault-injection campaign behind the table of ``docs/RELIABILITY.md``.

More kill points and repetitions than the quick tests. Every faulty run is a real
``python -m mmalign train|export`` process (through ``inject.py``, or signalled from outside:
SIGKILL at a random time / as soon as a temporary checkpoint directory appears, SIGTERM or
SIGINT at a random time). After each kill the script checks what a crash must leave behind
(complete, loadable checkpoints; after SIGTERM/SIGINT exit status 143/130, a checkpoint of
the step the run was on and no lock; no export chunk listed unless whole), then resumes in
this process and compares the result with an uninterrupted run (bit-identical weights;
byte-identical export files). Then the refusals of :mod:`campaign_refusals`: config faults,
diverging learning rates, settings changed on resume, torn ``metrics.jsonl``.

Usage::

    .venv/bin/python tests/reliability/run_faults.py --repeats 3 --seed 0

Example:
    >>> sorted(TRAIN_FAULTS)[:2]
    ['between optimizer steps', 'between the two renames that replace best/']
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from campaign_refusals import config_faults, diverging_runs, resume_changes, torn_metrics
from conftest import (
    INJECT,
    REPO,
    export_arguments,
    final_weights,
    subprocess_env,
    tiny_config,
    write_config,
    write_shards,
)
from data_faults import data_campaign, data_failures, data_table

from mmalign.config import load_config
from mmalign.data.exports import ExportError, read_manifest
from mmalign.export import run_export
from mmalign.model import AlignmentModel
from mmalign.training import checkpoint, train
from mmalign.training.optim import build_optimizer

STEPS, SAVE_EVERY, CHUNK, SAMPLES = 14, 3, 8, 48
SAVES = STEPS // SAVE_EVERY + 1  # periodic saves + the final one
PRUNED_FILES = 3 * (SAVES - 2)  # safetensors files of the pruned checkpoints (keep_last 2)
BEST_UPDATES = 5  # replacements of an existing best/ drawn from (validation every 2 steps)
SIGNALLED = {"external:SIGTERM": 143, "external:SIGINT": 130}
WITH_VALIDATION = "between the two renames that replace best/"
TRAIN_FAULTS: dict[str, tuple[str, int]] = {
    # fault: (inject.py kill spec with {call}, highest call number drawn); the run validates
    # every 2 steps (and so keeps a best/) only for WITH_VALIDATION
    "between optimizer steps": (
        "mmalign.training.trainer:Trainer._train_step:{call}:before",
        STEPS,
    ),
    "torn file in a temporary checkpoint": (
        "mmalign.training.checkpoint:save_file:{call}:truncate",
        2 * SAVES,
    ),
    "model written, rest of checkpoint missing": (
        "mmalign.training.checkpoint:save_model:{call}:after",
        SAVES,
    ),
    "checkpoint complete, before fsync + rename": (
        "mmalign.training.checkpoint:replace_directory:{call}:before",
        SAVES,
    ),
    "checkpoint renamed, before pruning old ones": (
        "mmalign.training.checkpoint:prune_checkpoints:{call}:before",
        SAVES,
    ),
    "final model written, before its rename": (
        "mmalign.model:AlignmentModel.save_pretrained:{call}:after",
        1,
    ),
    "external SIGKILL at a random time": ("external:random", 1),
    "external SIGKILL when .tmp-step-* appears": ("external:tmp-dir", 1),
    "while pruning: step-* renamed, deletion half done": (
        "os:unlink:{call}:after:safetensors",
        PRUNED_FILES,
    ),
    WITH_VALIDATION: ("os:replace:{call}:after:.old-best", BEST_UPDATES),
    "external SIGTERM at a random step (scheduler pre-emption)": ("external:SIGTERM", 1),
    "external SIGINT at a random step (Ctrl-C)": ("external:SIGINT", 1),
}
CHUNKS = SAMPLES // CHUNK
WRITER = "mmalign.export.writer"
EXPORT_FAULTS: dict[str, tuple[str, int]] = {
    "chunk files written, manifest not updated": (f"{WRITER}:_write_chunk:{{call}}:after", CHUNKS),
    "empty temporary metadata file": (f"{WRITER}:pq.write_table:{{call}}:before", CHUNKS),
    "between the files of a chunk": (f"{WRITER}:atomic_write:{{call}}:before", 2 * CHUNKS),
    "before a manifest update": (f"{WRITER}:write_json:{{call}}:before", CHUNKS),
}


@dataclass
class Tally:
    """Outcomes of one fault kind."""

    injected: int = 0
    killed: int = 0
    state_ok: int = 0
    resumed_identical: int = 0
    partial_left: int = 0
    """Kills that left a temporary (partial) directory or file behind."""
    progress: list[int] = field(default_factory=list)
    """Newest checkpoint step (training) or chunks listed (export) at each kill."""
    notes: list[str] = field(default_factory=list)


def start(arguments: list[str], kills: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(INJECT), *(f"--kill={k}" for k in kills), "--", *arguments]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_start(process: subprocess.Popen[bytes], log: Path) -> float:
    """Wait until the run writes its first log line (imports done); the time then."""
    while process.poll() is None and not log.exists():
        time.sleep(0.001)
    return time.monotonic()


def run_with_fault(
    arguments: list[str], spec: str, run: Path, rng: random.Random, duration: float
) -> int:
    """Run until the injected or external kill (or the end); the exit status.

    ``external:random`` kills at a uniform time of the training proper (``duration``
    seconds after ``train.log`` appears in an uninterrupted run); ``external:tmp-dir`` kills
    as soon as the k-th temporary checkpoint directory appears (k drawn from ``rng``);
    ``external:SIGTERM`` / ``external:SIGINT`` send that signal once as soon as the k-th
    step is logged (k uniform in 1..STEPS - 2) and wait for the run to end.
    """
    if not spec.startswith("external:"):
        return start(arguments, [spec]).wait(timeout=600)
    process = start(arguments, [])
    started = wait_for_start(process, run / "train.log")
    if spec in SIGNALLED:
        wanted, metrics = rng.randint(1, STEPS - 2), run / "metrics.jsonl"
        while process.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < wanted
        ):
            time.sleep(0.0005)
        if process.poll() is None:
            process.send_signal(getattr(signal, spec.removeprefix("external:")))
        return process.wait(timeout=600)
    deadline = started + rng.uniform(0.0, duration) if spec == "external:random" else math.inf
    wanted, seen = rng.randint(1, SAVES), set()
    while process.poll() is None and time.monotonic() < deadline:
        if spec == "external:tmp-dir":
            seen |= {path.name for path in (run / "checkpoints").glob(".tmp-step-*")}
            if len(seen) >= wanted:
                break
        time.sleep(0.0005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    return process.wait(timeout=600)


def checkpoints_ok(run: Path, config_path: Path) -> bool:
    """Every ``step-*`` is complete and the newest loads (vacuously true when none)."""
    found = checkpoint.list_checkpoints(run / "checkpoints")
    names = {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "trainer.json",
        "rng-rank0.safetensors",
        "rng-rank0.json",
    }
    if any({p.name for p in path.iterdir()} != names for path in found):
        return False
    if not found:
        return True
    config = load_config(config_path)
    model = AlignmentModel.from_config(config.model)
    optimizer = build_optimizer(model, config.train)
    state = checkpoint.load_checkpoint(found[-1], 0, model, optimizer)
    return state["step"] == int(found[-1].name.split("-")[1])


def same_weights(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return found.keys() == expected.keys() and all(
        torch.equal(found[k], expected[k]) for k in found
    )


def signal_state_ok(run: Path) -> bool:
    """After SIGTERM/SIGINT: no lock, and the newest checkpoint is the step the run says it
    stopped after."""
    found = re.search(r"stopped after step (\d+) of", (run / "train.log").read_text())
    newest = checkpoint.latest_checkpoint(run / "checkpoints")
    step = int(newest.name.split("-")[1]) if newest else -1
    return found is not None and int(found.group(1)) == step and not (run / ".lock").exists()


def campaign_config(run: Path, shards: str, validation: bool) -> dict:
    """The campaign's run: 14 steps, a checkpoint every 3; with ``validation`` also every 2
    steps on the last shard (a new best/ at most of them)."""
    if not validation:
        return tiny_config(run, shards, train={"steps": STEPS})
    val = shards.replace("{000000..000002}", "000002")
    return tiny_config(
        run, shards, train={"steps": STEPS}, data={"val": val}, eval={"every": 2, "max_samples": 16}
    )


def training_campaign(root: Path, shards: str, repeats: int, seed: int) -> dict[str, Tally]:
    expected = {
        validation: final_weights(
            train(campaign_config(root / f"reference-{validation}", shards, validation)).output_dir
        )
        for validation in (False, True)
    }
    timing = write_config(
        root / "timing.yaml", tiny_config(root / "timing", shards, train={"steps": STEPS})
    )
    process = start(["train", str(timing)], [])
    began = wait_for_start(process, root / "timing" / "train.log")
    process.wait(timeout=600)
    duration = time.monotonic() - began
    tallies = {}
    for number, (name, (template, calls)) in enumerate(TRAIN_FAULTS.items()):
        tally = tallies[name] = Tally()
        rng = random.Random(f"{seed}-{name}")
        for repeat in range(repeats):
            run = root / f"train-{number}-{repeat}"
            validation = name == WITH_VALIDATION
            config_path = write_config(
                run.with_suffix(".yaml"), campaign_config(run, shards, validation)
            )
            spec = template.format(call=rng.randint(1, calls))
            status = run_with_fault(["train", str(config_path)], spec, run, rng, duration)
            tally.injected += 1
            tally.killed += status == SIGNALLED.get(spec, -signal.SIGKILL)
            state_ok = checkpoints_ok(run, config_path)
            tally.state_ok += state_ok and (spec not in SIGNALLED or signal_state_ok(run))
            tally.partial_left += bool(list(run.glob("**/.tmp-*")) + list(run.glob("*/.[op]*")))
            newest = checkpoint.latest_checkpoint(run / "checkpoints")
            tally.progress.append(int(newest.name.split("-")[1]) if newest else 0)
            train(config_path, resume=True)
            identical = same_weights(final_weights(run), expected[validation]) and not list(
                (run / "checkpoints").glob(".*")
            )
            tally.resumed_identical += identical
            if not identical:
                tally.notes.append(spec)
    return tallies


def export_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def listed_chunks_ok(out: Path, expected: dict[str, bytes]) -> bool:
    """The export does not read as finished and every listed chunk is whole."""
    try:
        read_manifest(out)
        return False
    except ExportError:
        pass
    manifest = out / "manifest.json"
    chunks = json.loads(manifest.read_text())["chunks"] if manifest.exists() else []
    return all((out / f).read_bytes() == expected[f] for c in chunks for f in c["files"].values())


def export_campaign(root: Path, shards: str, repeats: int, seed: int) -> dict[str, Tally]:
    model_run = train(tiny_config(root / "export-model", shards, train={"steps": 3})).output_dir
    options = {
        "chunk_size": CHUNK,
        "dtype": "float32",
        "metadata_fields": ["cls"],
        "progress": False,
    }
    run_export(str(model_run), shards, None, root / "export-reference", **options)
    expected = export_files(root / "export-reference")
    tallies = {}
    for number, (name, (template, calls)) in enumerate(EXPORT_FAULTS.items()):
        tally = tallies[name] = Tally()
        rng = random.Random(f"{seed}-{name}")
        for repeat in range(repeats):
            out = root / f"export-{number}-{repeat}"
            arguments = export_arguments(model_run, shards, out, CHUNK)
            spec = template.format(call=rng.randint(1, calls))
            status = run_with_fault(arguments, spec, out, rng, 0.0)
            tally.injected += 1
            tally.killed += status == -signal.SIGKILL
            tally.state_ok += listed_chunks_ok(out, expected)
            tally.partial_left += bool(list(out.glob("**/.*.tmp*")))
            manifest = out / "manifest.json"
            listed = json.loads(manifest.read_text())["chunks"] if manifest.exists() else []
            tally.progress.append(len(listed))
            run_export(str(model_run), shards, None, out, **options)
            identical = export_files(out) == expected
            tally.resumed_identical += identical
            if not identical:
                tally.notes.append(spec)
    return tallies


def table(title: str, tallies: dict[str, Tally], progress: str, state: str, resumed: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"| fault injected | runs | SIGKILLed (SIGTERM: exit 143, SIGINT: 130) | partial files "
        f"left | {progress} | {state} | {resumed} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tally in tallies.items():
        runs = tally.injected
        lines.append(
            f"| {name} | {runs} | {tally.killed} | {tally.partial_left} | "
            f"{', '.join(map(str, tally.progress))} | {tally.state_ok}/{runs} | "
            f"{tally.resumed_identical}/{runs} |"
        )
        lines += [f"|  failed: `{note}` | | | | | | |" for note in tally.notes]
    return "\n".join(lines)


def refusal_table(rows: list[tuple[str, int, int, str]]) -> str:
    lines = [
        "### Refused or survived without a kill (config, divergence, resume, metrics)",
        "",
        "| fault | cases | as required | required |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {fault} | {cases} | {passed}/{cases} | {needed} |"
        for fault, cases, passed, needed in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per fault kind")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="mmalign-faults-"))
    began = time.monotonic()
    try:
        shards = write_shards(root / "shards", samples=SAMPLES)
        training = training_campaign(root, shards, options.repeats, options.seed)
        print(
            table(
                "Kill during training (tabular + graph model, 14 steps, checkpoint every 3)",
                training,
                "newest checkpoint at kill (step)",
                "all step-* complete, newest loads",
                "--resume gives bit-identical weights",
            ),
            flush=True,
        )
        exports = export_campaign(root, shards, options.repeats, options.seed)
        print(
            "\n"
            + table(
                "Kill during export (48 records, chunks of 8)",
                exports,
                "chunks listed at kill",
                "only whole chunks listed, not finished",
                "restart gives byte-identical files",
            ),
            flush=True,
        )
        data = data_campaign(root, options.repeats, options.seed)
        print("\n" + data_table(data), flush=True)
        refusals = [
            *config_faults(root, shards),
            *diverging_runs(root, shards, options.repeats, options.seed),
            *resume_changes(root, shards),
            *torn_metrics(root, shards),
        ]
        print("\n" + refusal_table(refusals), flush=True)
    finally:
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{time.monotonic() - began:.0f} s in all")
    failures = sum(
        t.injected - t.resumed_identical + t.injected - t.state_ok
        for t in [*training.values(), *exports.values()]
    ) + sum(cases - passed for _, cases, passed, _ in refusals)
    return 1 if failures + data_failures(data) else 0


if __name__ == "__main__":
    raise SystemExit(main())
