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

from mmalign.cli.main import main
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
    with pytest.raises(MetricsError, match=f"line 1 is not a metrics record: .*\\({metrics}:1\\)"):
        read_metrics(metrics)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"train/loss": 1.5}', 'no whole-number "step"'),  # a traceback (KeyError) before
        ('{"step": "2", "train/loss": 1.5}', 'no whole-number "step"'),
        ('{"step": 2, "train/loss": "x"}', "'train/loss' is not a number"),
        ("[1, 2]", "a JSON list, not an object"),
        ("\udcff", "Expecting value: line 1 column 1 (char 0)"),
    ],
    ids=["no step", "text step", "text value", "list", "not UTF-8"],
)
def test_an_invalid_metrics_line_is_refused_or_dropped_when_last(
    tmp_path: Path, line: str, problem: str
) -> None:
    metrics, good = tmp_path / "metrics.jsonl", ['{"step": 1, "a": 1.0}', '{"step": 2}']
    metrics.write_bytes("\n".join([good[0], line, good[1]]).encode(errors="surrogateescape"))
    expected = f"line 2 is not a metrics record: {problem} ({metrics}:2); fix or delete that line"
    with pytest.raises(MetricsError) as caught:
        read_metrics(metrics)
    assert str(caught.value) == expected
    metrics.write_bytes("\n".join([*good, line]).encode(errors="surrogateescape"))
    with pytest.warns(UserWarning, match=r"the last line \(3\) was cut off"):
        assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    metrics.write_bytes("\n".join([*good, line, ""]).encode(errors="surrogateescape"))
    with pytest.raises(MetricsError, match=r"line 3 is not a metrics record"):  # a whole line:
        read_metrics(metrics)  # written to its end, so not cut by a kill (was "cut off")


def test_resume_over_a_metrics_line_without_step_is_one_line(
    tmp_path: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": 2, "save_every": 2})
    )
    train(config)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"train/loss": 1.5}', *lines[1:]]) + "\n")
    assert main(["train", str(config), "--resume", "--set", "train.steps=3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'mmalign: error: line 2 is not a metrics record: no whole-number "step" ({metrics}:2); '
        "fix or delete that line"
    )


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
    refused = rf"^the run's config is not valid YAML: .* \({re.escape(str(saved))}\); "
    with pytest.raises(ConfigError, match=refused):
        train(config, ["train.steps=5"], resume=True)
    with pytest.raises(ConfigError, match=refused):
        run_fields(run)
    assert not marker.exists()
