"""The entry point :func:`train` and the run directory's lifecycle.

Layout of ``train.output``::

    .lock              the PID and host of the run using the directory
    config.yaml        the resolved config of the run
    run.json           strategy, world size, nodes, processes per node, precision, versions
    metrics.jsonl      one JSON record per log / validation step
    train.log          the messages of the run
    events.out.tfevents.*   TensorBoard
    *.png              plots of loss, temperature, validation metrics
    checkpoints/       step-XXXXXXXX/ (last K) and best/
    model/             the final model (``AlignmentModel.from_pretrained``)
    sample_keys/       rank-00000.jsonl ...: the keys each process trained on (``log_sample_keys``)
    eval/              ``mmalign eval RUN``'s report
    .mmalign-output.json   the record that mmalign train made the directory
                       (:mod:`mmalign.output_owner`)

A run never silently overwrites another, nor writes among other files: a non-empty
``train.output`` must be a run directory (its record, and nothing but the files above), the
directory is locked (:class:`mmalign.files.DirectoryLock`), a directory holding a run is only
continued with
``resume``, and only with changes :mod:`mmalign.training.resume` allows (checked against the
run's ``config.yaml`` when a checkpoint exists). Resuming a finished run returns its result
without training. SIGTERM/SIGINT save the current step and raise
:class:`~mmalign.training.signals.TrainingInterrupted`; a full disk is a
:class:`~mmalign.errors.UserError` naming the newest complete checkpoint.

Example:
    >>> from mmalign.training import train
    >>> demo = "mmalign/demo/configs/demo_digits.yaml"
    >>> result = train(demo, ["train.steps=50"])  # doctest: +SKIP
    >>> result.model_dir  # doctest: +SKIP
    PosixPath('runs/demo_digits/model')
"""

from __future__ import annotations

import errno
import importlib.util
import platform
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import accelerate
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from mmalign.config import Config, load_config
from mmalign.errors import UserError
from mmalign.extras import missing_extra
from mmalign.files import (
    DirectoryLock,
    LockError,
    atomic_write,
    refuse_links,
    replace_directory,
    write_json,
)
from mmalign.model import AlignmentModel
from mmalign.output_owner import (
    Output,
    adopt_output,
    check_output,
    record_output,
    remove_unused,
)
from mmalign.training import checkpoint
from mmalign.training.checks import check_run_config, total_steps
from mmalign.training.host_memory import host_memory, host_memory_policy
from mmalign.training.logging import LOG_FILE, METRICS_FILE, read_metrics
from mmalign.training.normalization import fit_normalizers
from mmalign.training.parallel import check_launch
from mmalign.training.parallel.base import describe_run
from mmalign.training.plan import check_precision, describe_plan
from mmalign.training.resume import check_resume_changes
from mmalign.training.sample_keys import DIRECTORY as SAMPLE_KEYS
from mmalign.training.shared_output import require_shared_output
from mmalign.training.signals import StopSignals
from mmalign.training.trainer import Trainer

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
CONFIG_FILE = "config.yaml"
RUN_INFO = "run.json"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
RUN_OUTPUT = Output(
    "train",
    "train.output",
    (
        *(CONFIG_FILE, RUN_INFO, METRICS_FILE, LOG_FILE, "events.out.tfevents.*", "*.png"),
        *(f"{CHECKPOINTS}/", f"{MODEL_DIR}/", f"{SAMPLE_KEYS}/", "eval/"),
    ),
    folder="run directory",
)
"""The owner of a run directory (:mod:`mmalign.output_owner`): the files a run rewrites."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Example:
        >>> result = TrainResult(Path("runs/a"), Path("runs/a/model"), 10, 1, 0.5)
        >>> result.steps, result.metrics, result.best_checkpoint
        (10, {}, None)
    """

    output_dir: Path
    model_dir: Path
    steps: int
    world_size: int
    final_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last validation metrics (empty without ``data.val``)."""
    best_metric: float | None = None
    best_checkpoint: Path | None = None
    nonfinite_steps: int = 0
    already_finished: bool = False
    """A resumed run that had already reached its last step: nothing was trained."""


def _result(
    output: Path,
    state: Mapping[str, Any],
    world_size: int,
    final_loss: float | None,
    metrics: dict[str, float],
) -> TrainResult:
    """The result of the run in ``output`` whose trainer state (``trainer.json``) is
    ``state``."""
    best = state.get("best")
    best_dir = output / CHECKPOINTS / checkpoint.BEST
    return TrainResult(
        output_dir=output,
        model_dir=output / MODEL_DIR,
        steps=state["step"],
        world_size=world_size,
        final_loss=final_loss,
        metrics=metrics,
        best_metric=None if best is None else best["value"],
        best_checkpoint=best_dir if best is not None and best_dir.exists() else None,
        nonfinite_steps=state.get("nonfinite_total", 0),
    )


def _check_fresh_or_resume(directory: Path, resume: bool) -> None:
    """Refuse to start a new run over an existing one unless resuming."""
    if resume or not directory.is_dir():
        return
    markers = [
        name for name in (CONFIG_FILE, CHECKPOINTS, MODEL_DIR) if (directory / name).exists()
    ]
    if markers:
        raise LockError(
            f"{directory} already holds a training run ({', '.join(markers)}); pass --resume "
            f"(resume=True) to continue it, or set train.output to a new directory"
        )


def _adopt_earlier_run(output: Path) -> None:
    """A run directory written before runs carried a record (:mod:`mmalign.output_owner`)
    becomes this run's own once, so it resumes as before: it must hold the run's
    ``run.json`` and ``config.yaml``, a complete checkpoint, and no file a run does not write.
    Anything less stays refused as a foreign folder."""
    evidence = (output / RUN_INFO).is_file() and (output / CONFIG_FILE).is_file()
    complete = evidence and checkpoint.latest_checkpoint(output / CHECKPOINTS) is not None
    if complete and adopt_output(output, RUN_OUTPUT):
        warnings.warn(f"{output}: a run of an earlier mmalign, now recorded", stacklevel=2)


def _check_resumable(output: Path, config: Config) -> None:
    """With a checkpoint to resume from, ``config`` may change only what
    :mod:`mmalign.training.resume` allows; without one the run starts afresh."""
    saved = output / CONFIG_FILE
    if saved.is_file() and checkpoint.latest_checkpoint(output / CHECKPOINTS) is not None:
        check_resume_changes(saved, config)


def _prepare_directory(
    config: Config, accelerator: Accelerator, resume: bool
) -> DirectoryLock | None:
    """Main process: refuse a busy or finished run dir, take the lock; every rank learns of
    an error so none waits forever, and checks that it sees the lock (a shared
    ``train.output``, :mod:`mmalign.training.shared_output`)."""
    output = Path(config.train.output)
    lock, error, owner = None, None, ""
    if accelerator.is_main_process:
        try:
            _adopt_earlier_run(output)
            check_output(output, RUN_OUTPUT)  # a folder of other files: before any is written
            _check_fresh_or_resume(output, resume)
            lock = DirectoryLock(output)
            lock.acquire()
            owner = lock.path.read_text()
            refuse_links(output, "run directory", "train.output")
            record_output(output, RUN_OUTPUT)
            checkpoint.recover(output / CHECKPOINTS)
            _check_resumable(output, config)
        except Exception as caught:  # every rank must hear of it, whatever it is
            if lock is not None:
                lock.release()
            error = caught
    # a user error stays one (one line from every rank, no traceback); the class goes by name
    kind: type[Exception] = type(error) if isinstance(error, UserError) else RuntimeError
    shared: list[Any] = [None if error is None else str(error), owner, kind]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared, from_process=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        raise shared[2](shared[0])
    try:
        require_shared_output(accelerator, output, str(shared[1]))  # rank 0's lock line
    except UserError:
        if lock is not None:
            lock.release()
        raise
    return lock


def _write_run_files(config: Config, accelerator: Accelerator, steps: int) -> None:
    output = Path(config.train.output)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(output / CONFIG_FILE, lambda handle: handle.write(text.encode()))
    info = {
        **describe_run(config.train.strategy, config.train.precision, accelerator.num_processes),
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "host_memory": host_memory_policy(
            config.train.host_memory, config.train.gradient_checkpointing
        ),
        "total_steps": steps,
        "global_batch": config.data.batch_size
        * config.train.accumulate
        * accelerator.num_processes,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    write_json(output / RUN_INFO, info)


def _save_model(model: AlignmentModel, final: Path, state: dict | None = None) -> Path:
    """``model.save_pretrained`` into ``final``, atomically (main process); with ``state``
    (the whole weights of a sharded model) a fresh model of the same config holding them."""
    if state is not None:
        model = AlignmentModel.from_config(model.config)
        model.load_state_dict(state)
    temporary = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    return replace_directory(temporary, final)


def _finished_result(config: Config, accelerator: Accelerator) -> TrainResult | None:
    """The result of a run that already reached its last step (resume with nothing to do)."""
    output = Path(config.train.output)
    latest = checkpoint.latest_checkpoint(output / CHECKPOINTS)
    if latest is None or not (output / MODEL_DIR).is_dir():
        return None
    state = checkpoint.read_trainer_state(latest)
    if state["step"] < total_steps(config):
        return None
    records = [r for r in read_metrics(output / METRICS_FILE) if "val/loss" in r]
    metrics = {k: v for k, v in (records[-1] if records else {}).items() if k != "step"}
    result = _result(output, state, accelerator.num_processes, None, metrics)
    return replace(result, already_finished=True)


def _train(
    config: Config, accelerator: Accelerator, resume: bool, signals: StopSignals
) -> TrainResult:
    """Train in the prepared (locked) run directory; the result."""
    trainer = Trainer(config, accelerator, resume, signals)
    if accelerator.is_main_process:
        _write_run_files(config, accelerator, trainer.total)
    accelerator.wait_for_everyone()
    with trainer.logs():
        if trainer.step == 0:  # a resumed run keeps the statistics of its checkpoint
            for modality, count in fit_normalizers(trainer.model, config.data).items():
                trainer.message(f"{modality}: normalization statistics fit over {count} records")
        with host_memory(config.train.host_memory, config.train.gradient_checkpointing) as memory:
            trainer.run(memory)
        state = trainer.strategy.full_state_dict(trainer.model)  # collective under fsdp
        if accelerator.is_main_process:  # saved before the last validation, which may fail
            model_dir = _save_model(trainer.final_model, trainer.output / MODEL_DIR, state)
        accelerator.wait_for_everyone()
        trainer.validate_last()
        if accelerator.is_main_process:
            trainer.message(f"done: {trainer.step} steps; final model in {model_dir}")
    return _result(
        trainer.output,
        trainer.state(),
        accelerator.num_processes,
        trainer.last_loss,
        trainer.last_metrics,
    )


def _training_device() -> torch.device:
    """The device :func:`_accelerator` trains on: the accelerator when there is one."""
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return device if device is not None else torch.device("cpu")


def _disk_full(output: Path, error: OSError) -> UserError:
    latest = checkpoint.latest_checkpoint(output / CHECKPOINTS)
    kept = f"the newest complete checkpoint is {latest}" if latest else "no checkpoint is saved"
    return UserError(
        f"no space left on the device of {output} (writing {error.filename or 'a file'}); "
        f"{kept}; free space (or lower train.keep_last) and continue with --resume"
    )


def _check_extras(config: Config) -> None:
    """Refuse before training when a log asked for needs a package that is not installed."""
    for key, package in (("tensorboard", "tensorboard"), ("plots", "matplotlib")):
        if getattr(config.train, key) and importlib.util.find_spec(package) is None:
            raise missing_extra(key, f"train.{key}", f"or set train.{key}: false")


def _accelerator(config: Config) -> Accelerator:
    return Accelerator(
        log_with="tensorboard" if config.train.tensorboard else None,
        project_dir=config.train.output,
        # without a GPU, several launched processes still form a (gloo) group
        cpu=not torch.accelerator.is_available(),
        mixed_precision=MIXED_PRECISION[config.train.precision],
        gradient_accumulation_steps=1,
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=config.train.find_unused_parameters
            )
        ],
    )


def train(
    config: str | Path | dict[str, Any] | Config,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train an :class:`~mmalign.AlignmentModel` as ``config`` says; returns the run's result.

    ``config`` is a YAML path, a dict or a :class:`~mmalign.config.Config`; ``overrides`` are
    ``key.sub=value`` strings (``train.steps=10``). With ``resume`` the run continues from the
    newest checkpoint in ``train.output`` (or starts fresh when there is none). Run several
    processes with ``accelerate launch -m mmalign train CONFIG``. Raises
    :class:`~mmalign.training.TrainingStopped` after ``train.max_nonfinite`` non-finite
    steps in a row.

    Example:
        >>> demo = "mmalign/demo/configs/demo_digits.yaml"
        >>> result = train(demo, ["train.steps=20"])  # doctest: +SKIP
        >>> AlignmentModel.from_pretrained(result.model_dir)  # doctest: +SKIP
    """
    config = load_config(config, overrides)
    check_run_config(config)
    check_precision(config, _training_device())
    check_launch(config)
    _check_extras(config)
    accelerator = _accelerator(config)
    lock, created, succeeded = None, not Path(config.train.output).exists(), False
    try:
        with StopSignals() as signals:
            lock = _prepare_directory(config, accelerator, resume)
            finished = _finished_result(config, accelerator) if resume else None
            if finished is not None:
                succeeded = True
                return finished
            if accelerator.is_main_process:
                print(
                    describe_plan(config, accelerator.num_processes, accelerator.device),
                    flush=True,
                )
            result = _train(config, accelerator, resume, signals)
            succeeded = True
            return result
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(Path(config.train.output), error) from None
    finally:
        if lock is not None:
            lock.release()
            if created and not succeeded:  # failed before writing a file: leave no folder
                remove_unused(Path(config.train.output))
        accelerator.end_training()
