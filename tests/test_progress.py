"""Progress bars show on a terminal only, and the plain training line says the ETA."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from mmalign.progress import progress_bar, remaining_time
from mmalign.training.logging import RunLogger


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_is_drawn_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(total=3, desc="fit").disable
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(total=4, desc="fit", unit="model", file=terminal) as bar:
        assert not bar.disable
        bar.update(2)
    assert "2/4" in terminal.getvalue()
    assert progress_bar(total=3, desc="fit", show=False).disable  # --no-progress


def test_remaining_time_is_the_rate_so_far() -> None:
    assert remaining_time(1, 4, 10.0) == "30s"
    assert remaining_time(10, 100, 60.0) == "9m00s"
    assert remaining_time(1, 100, 3600.0) == "99h00m"
    assert remaining_time(0, 100, 5.0) == "?"


def test_plain_training_lines_give_the_eta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([100.0, 130.0])  # started at 100 s; step 3 of 10 logged at 130 s
    monkeypatch.setattr("mmalign.training.logging.time.perf_counter", lambda: next(clock))
    logger = RunLogger(tmp_path, total_steps=10, start_step=1, progress=False)
    logger.log(3, {"train/loss": 1.5})
    logger.close(plots=False)
    assert capsys.readouterr().err.strip().endswith("eta 1m45s")  # 7 steps left, 15 s each
