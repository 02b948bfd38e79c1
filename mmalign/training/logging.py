"""Training logs: a progress bar or plain lines, ``metrics.jsonl``, TensorBoard and PNG plots.

Only the main process writes. On a terminal a tqdm bar shows loss, temperature and samples/s;
elsewhere (CI, files) a plain line is printed every ``train.log_every`` steps. Messages also
go to ``train.log`` in the run directory.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     logger = RunLogger(Path(tmp), total_steps=2, tensorboard=False, progress=False)
    ...     logger.log(1, {"train/loss": 1.5})
    ...     _ = logger.close(plots=False)
    ...     read_metrics(Path(tmp) / "metrics.jsonl")[0]["train/loss"]
    1.5
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmalign.training.curves import plot_metrics

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
_BAR_KEYS = {"train/loss": "loss", "train/temperature": "temp", "train/samples_per_s": "samples/s"}
_VALIDATION_SUMMARY = (
    "val/loss",
    "val/instance/R@1/mean",
    "val/class/R@1/mean",
    "val/zeroshot/top1",
    "val/zeroshot/balanced_accuracy",
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run rewrites them)."""
    kept = [record for record in read_metrics(path) if record["step"] <= last_step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _format_value(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunLogger:
    """Writes metrics and messages of the main process (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        log_every: int = 10,
        tensorboard: bool = True,
        progress: bool | None = None,
    ) -> None:
        self.directory = directory
        self.total_steps = total_steps
        self.log_every = log_every
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / METRICS_FILE
        self._metrics = self.metrics_path.open("a")
        self._messages = (directory / LOG_FILE).open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(directory), purge_step=start_step + 1)
        use_bar = sys.stderr.isatty() if progress is None else progress
        self._bar = (
            tqdm(total=total_steps, initial=start_step, dynamic_ncols=True) if use_bar else None
        )

    def message(self, text: str) -> None:
        """Print a message (above the bar) and append it to ``train.log``."""
        tqdm.write(text, file=sys.stderr)
        self._messages.write(text + "\n")
        self._messages.flush()

    def log(self, step: int, record: dict[str, float]) -> None:
        """Append ``record`` at ``step`` to the JSONL file and TensorBoard; update the display."""
        self._metrics.write(json.dumps({"step": step, **record}) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(key, value, step)
        shown = {_BAR_KEYS[key]: _format_value(record[key]) for key in _BAR_KEYS if key in record}
        if shown and self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif shown:
            fields = " ".join(f"{name} {value}" for name, value in shown.items())
            self.message(f"step {step}/{self.total_steps} {fields}")
        summary = [key for key in _VALIDATION_SUMMARY if key in record]
        if summary:
            fields = " ".join(f"{key} {_format_value(record[key])}" for key in summary)
            self.message(f"step {step}/{self.total_steps} validation: {fields}")

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self._bar is not None:
            self._bar.update(steps)

    def close(self, plots: bool = True) -> list[Path]:
        """Close files and the bar; write the PNG plots when ``plots``. Returns the PNGs."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._metrics.close()
        self._messages.close()
        return plot_metrics(read_metrics(self.metrics_path), self.directory) if plots else []
