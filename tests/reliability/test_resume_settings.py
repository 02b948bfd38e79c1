"""What ``--resume`` may change (and that it takes effect), what it refuses naming the field,
and a torn or killed rewrite of ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
from conftest import fork_mmalign, tiny_config, write_config

from mmalign.config import ConfigError
from mmalign.eval.loading import run_fields
from mmalign.training import train
from mmalign.training.logging import MetricsError, read_metrics

WARMUP = 2


def cosine_lr(base: float, step: int, total: int) -> float:
    """transformers' warmup + cosine factor after ``step`` scheduler steps, times ``base``."""
    if step < WARMUP:
        return base * step / WARMUP
    progress = (step - WARMUP) / (total - WARMUP)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_new_lr_logs_and_uses_it(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, shards, train={"steps": 4, "save_every": 2, "lr": 0.05})
    train(config)
    result = train(config, ["train.lr=1e-4", "train.steps=6"], resume=True)
    assert result.steps == 6
    logged = {r["step"]: r["train/lr"] for r in records(run)}
    assert logged[3] == pytest.approx(cosine_lr(0.05, 3, 4))
    for step in (5, 6):
        assert logged[step] == pytest.approx(cosine_lr(1e-4, step, 6), rel=1e-9, abs=1e-15)
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.0001" in saved


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.batch_size=4", "data.batch_size"),
        ("train.seed=3", "train.seed"),
        ("model.dim=16", "model.dim"),
        ("train.accumulate=2", "train.accumulate"),
    ],
)
def test_resume_refuses_other_changes_naming_the_field(
    tmp_path: Path, shards: str, override: str, field: str
) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, shards, train={"steps": 3})
    train(config)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"^{field}: a resumed run cannot change it"):
        train(config, [override, "train.steps=5"], resume=True)
    assert (run / "config.yaml").read_text() == before
    assert not (run / ".lock").exists()


def test_torn_last_metrics_line_is_dropped_and_reported(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, shards, train={"steps": 6, "save_every": 3})
    train(config)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][:17])  # killed mid-write
    with pytest.warns(UserWarning, match=f"{metrics}: the last line \\(5\\) was cut off"):
        assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    train(config, ["train.steps=8"], resume=True)  # from step 6: the records of 5, 6 are lost
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 7, 8]
    assert f"{metrics}: the last line (5) was cut off" in (run / "train.log").read_text()

    metrics.write_text("\n".join(["{broken", *lines[1:]]) + "\n")
    with pytest.raises(MetricsError, match=f"{metrics}:1 is not a JSON record"):
        read_metrics(metrics)


@pytest.mark.launches
def test_kill_while_resume_rewrites_metrics_keeps_every_line(tmp_path: Path, shards: str) -> None:
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": 6, "save_every": 4})
    )
    train(config)
    before = (run / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 6
    kill = "mmalign.training.logging:atomic_write:1:before"
    status = fork_mmalign(["train", str(config), "--resume", "--set", "train.steps=9"], [kill])
    assert status == -signal.SIGKILL
    assert (run / "metrics.jsonl").read_text() == before  # untouched, not cut
    train(config, ["train.steps=9"], resume=True)
    assert [r["step"] for r in records(run)] == list(range(1, 10))


def test_a_yaml_tag_in_a_runs_config_is_an_error_naming_the_file(
    tmp_path: Path, shards: str
) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, shards, train={"steps": 3})
    train(config)
    marker = tmp_path / "executed"
    saved = run / "config.yaml"
    saved.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    refused = rf"^the run's config {re.escape(str(saved))} is not valid YAML"
    with pytest.raises(ConfigError, match=refused):
        train(config, ["train.steps=5"], resume=True)
    with pytest.raises(ConfigError, match=refused):
        run_fields(run)
    assert not marker.exists()
