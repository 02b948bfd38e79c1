"""Training logs: a progress bar or plain lines, ``metrics.jsonl``, TensorBoard and PNG plots.

Only the main process writes. TensorBoard goes through Accelerate's trackers: the run's
``Accelerator`` is built with ``log_with="tensorboard"`` and ``project_dir`` the run directory
(``train.tensorboard``), and the logger sends every numeric record to ``accelerator.log``, so
the event files land in the run directory. On a terminal a tqdm bar shows loss, temperature
and samples/s with the ETA; elsewhere (CI, files) a plain line with the ETA is printed every
``train.log_every`` steps.
Messages also go to ``train.log`` in the run directory, and so do the data loader's warnings
(logger ``mmalign.data``: each skipped record with its shard, key and reason).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     logger = RunLogger(Path(tmp), total_steps=2, progress=False)
    ...     logger.log(1, {"train/loss": 1.5})
    ...     _ = logger.close(plots=False)
    ...     read_metrics(Path(tmp) / "metrics.jsonl")[0]["train/loss"]
    1.5
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mmalign.errors import UserError
from mmalign.files import atomic_write, open_append
from mmalign.progress import remaining_time

if TYPE_CHECKING:
    from accelerate import Accelerator

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


class MetricsError(UserError, ValueError):
    """A ``metrics.jsonl`` line other than the last is no metrics record (the file was
    edited)."""


def metrics_record(line: str) -> dict[str, Any]:
    """One ``metrics.jsonl`` line as the record :meth:`RunLogger.log` writes: a JSON object
    with a whole-number ``step`` and numbers; a ``ValueError`` saying what is wrong otherwise.

    Example:
        >>> metrics_record('{"step": 2, "train/loss": 0.5}')
        {'step': 2, 'train/loss': 0.5}
        >>> metrics_record('{"train/loss": 0.5}')
        Traceback (most recent call last):
        ...
        ValueError: no whole-number "step"
    """
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    step = record.get("step")
    if type(step) is not int or step < 0:
        raise ValueError('no whole-number "step"')
    for key, value in record.items():
        if type(value) not in (int, float):
            raise ValueError(f"{key!r} is not a number")
    return record


def _parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of ``path`` and a note when its last line is torn (dropped): a last line
    with no line end (a write the kill cut) that is no record; any other line that is no
    record (the file was edited) is a :class:`MetricsError`."""
    if not path.is_file():
        return [], None
    text = path.read_text(errors="replace")  # a byte that is no UTF-8: that line is refused
    lines = [line for line in text.splitlines() if line.strip()]
    whole = len(lines) if text.endswith("\n") else len(lines) - 1  # lines written to the end
    records, torn = [], None
    for number, line in enumerate(lines, start=1):
        try:
            records.append(metrics_record(line))
        except (ValueError, RecursionError) as error:  # json's errors are ValueErrors
            if number <= whole:
                raise MetricsError(
                    f"line {number} is not a metrics record: {error} ({path}:{number}); fix or "
                    "delete that line"
                ) from None
            torn = (
                f"{path}: the last line ({number}) was cut off (the run was killed while "
                "writing it); it is dropped"
            )
    return records, torn


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty when it does not exist); a torn last
    line (a write cut by a kill) is dropped with a warning naming the file."""
    records, torn = _parse_metrics(path)
    if torn:
        warnings.warn(torn, stacklevel=2)
    return records


def truncate_metrics(path: Path, last_step: int) -> str | None:
    """Atomically rewrite ``path`` without the records after ``last_step`` (a resumed run
    writes them again) and without a torn last line; returns a note naming the file when
    a torn line was dropped."""
    if not path.is_file():
        return None
    records, torn = _parse_metrics(path)
    text = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= last_step)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return torn


def _format_value(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _ToRunLog(logging.Handler):
    """Sends log records (the data loader's skipped records) to :meth:`RunLogger.message`."""

    def __init__(self, run_logger: RunLogger) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.message(record.getMessage())


class RunLogger:
    """Writes metrics and messages of the main process (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        log_every: int = 10,
        trackers: Accelerator | None = None,
        progress: bool | None = None,
    ) -> None:
        self.directory = directory
        self.total_steps = total_steps
        self._start_step, self._started = start_step, time.perf_counter()
        self.log_every = log_every
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / METRICS_FILE
        self._metrics = open_append(self.metrics_path)
        self._messages = open_append(directory / LOG_FILE)
        self._data_log = _ToRunLog(self)
        logging.getLogger("mmalign.data").addHandler(self._data_log)
        self._trackers = trackers
        if trackers is not None:
            # events after start_step (of a run that went further before its resume) are purged
            trackers.init_trackers("", init_kwargs={"tensorboard": {"purge_step": start_step + 1}})
        use_bar = sys.stderr.isatty() if progress is None else progress
        self._bar = (
            tqdm(total=total_steps, initial=start_step, dynamic_ncols=True) if use_bar else None
        )

    def message(self, text: str, echo: bool = True) -> None:
        """Print a message (above the bar, unless ``echo`` is false) and append it to
        ``train.log``."""
        if echo:
            tqdm.write(text, file=sys.stderr)
        self._messages.write(text + "\n")
        self._messages.flush()

    def log(self, step: int, record: dict[str, float]) -> None:
        """Append ``record`` at ``step`` to the JSONL file and TensorBoard; update the display."""
        self._metrics.write(json.dumps({"step": step, **record}) + "\n")
        self._metrics.flush()
        if self._trackers is not None:
            numbers = {
                key: value for key, value in record.items() if isinstance(value, int | float)
            }
            self._trackers.log(numbers, step=step)
        shown = {_BAR_KEYS[key]: _format_value(record[key]) for key in _BAR_KEYS if key in record}
        if shown and self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif shown:
            fields = " ".join(f"{name} {value}" for name, value in shown.items())
            done, elapsed = step - self._start_step, time.perf_counter() - self._started
            eta = remaining_time(done, self.total_steps - self._start_step, elapsed)
            self.message(f"step {step}/{self.total_steps} {fields} eta {eta}")
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
        logging.getLogger("mmalign.data").removeHandler(self._data_log)
        if self._bar is not None:
            self._bar.close()
        if self._trackers is not None:
            for tracker in self._trackers.trackers:
                tracker.finish()  # the events are on disk when the run returns
        self._metrics.close()
        self._messages.close()
        if not plots:
            return []
        from mmalign.training.curves import plot_metrics  # matplotlib: the plots extra

        return plot_metrics(read_metrics(self.metrics_path), self.directory)
