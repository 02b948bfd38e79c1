"""The training loop: Accelerate, contrastive-exact accumulation, validation, checkpoints.

Example:
    >>> from mmalign.training import train
    >>> result = train("mmalign/demo/configs/demo_digits.yaml", ["train.steps=50"])  # doctest: +SKIP
    >>> result.model_dir  # doctest: +SKIP
    PosixPath('runs/demo_digits/model')
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

from mmalign.config import Config, ConfigError, load_config
from mmalign.data import make_loader
from mmalign.model import AlignmentModel
from mmalign.training import checkpoint
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from mmalign.training.checks import check_run_config, total_steps
from mmalign.training.logging import RunLogger, read_metrics, truncate_metrics
from mmalign.training.optim import build_optimizer, build_scheduler
from mmalign.files import DirectoryLock
from mmalign.training.rundir import check_fresh_or_resume
from mmalign.training.stream import BatchStream, epoch_seed
from mmalign.training.timing import StepTimer
from mmalign.training.validation import Validator

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
RUN_INFO = "run.json"


class TrainingStopped(RuntimeError):
    """Training stopped early (too many non-finite losses in a row)."""


@dataclass
class TrainResult:
    """What a finished run produced."""

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


def _broadcast(accelerator: Accelerator, value: Any) -> Any:
    shared = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared, from_process=0)
    return shared[0]


def _prepare_directory(config: Config, accelerator: Accelerator, resume: bool) -> DirectoryLock | None:
    """Main process: refuse a busy or finished run dir, take the lock; every rank learns of
    an error so none waits forever."""
    output = Path(config.train.output)
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            check_fresh_or_resume(output, resume)
            lock = DirectoryLock(output)
            lock.acquire()
            _check_same_model(output, config)
        except (RuntimeError, ConfigError) as caught:
            if lock is not None:
                lock.release()
            error = caught
    message = _broadcast(accelerator, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(message)
    return lock


def _check_same_model(output: Path, config: Config) -> None:
    saved = output / "config.yaml"
    if not saved.is_file():
        return
    previous = (yaml.safe_load(saved.read_text()) or {}).get("model")
    if previous != config.to_dict()["model"]:
        raise ConfigError(
            f"model: differs from the model section of {saved}; a resumed run needs the same "
            "model config (set train.output to a new directory for a new model)"
        )


def _write_run_files(config: Config, accelerator: Accelerator, steps: int) -> None:
    output = Path(config.train.output)
    (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    info = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
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
    (output / RUN_INFO).write_text(json.dumps(info, indent=1))


class Trainer:
    """One training run (use :func:`train`)."""

    def __init__(self, config: Config, accelerator: Accelerator, resume: bool) -> None:
        self.config = config
        self.accelerator = accelerator
        self.resume = resume
        self.output = Path(config.train.output)
        self.checkpoints = self.output / "checkpoints"
        self.total = total_steps(config)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.best: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_saved = -1
        self.last_loss: float | None = None
        self.last_objective_metrics: dict[str, float] = {}
        self._skipped_reported = 0
        self._interval = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "start": time.perf_counter()}
        self._build()

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        config, accelerator = self.config, self.accelerator
        set_seed(config.train.seed)
        model = AlignmentModel.from_config(config.model)
        set_seed(config.train.seed, device_specific=True)
        optimizer = build_optimizer(model, config.train)
        self.scheduler = build_scheduler(optimizer, config.train, self.total)
        self.step_module, self.optimizer = accelerator.prepare(ContrastiveStep(model), optimizer)
        self.model: AlignmentModel = accelerator.unwrap_model(self.step_module).model
        self.step_module.train()
        self.validator = Validator(config, self._loader) if config.data.val else None
        synchronize = (
            torch.cuda.synchronize
            if config.train.profile and accelerator.device.type == "cuda"
            else None
        )
        self.timer = StepTimer(synchronize)

    def _loader(self, split: str, label_field: str | None = None, seed: int | None = None) -> Any:
        data, training = self.config.data, split == "train"
        return make_loader(
            getattr(data, split),
            self.model.towers,
            data.fields,
            data.batch_size,
            workers=data.workers,
            shuffle_buffer=data.shuffle_buffer if training else 0,
            resampled=data.resampled if training else False,
            seed=data.seed if seed is None else seed,
            epoch_samples=data.epoch_samples if training else None,
            label_field=label_field,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            drop_last=training or self.accelerator.num_processes > 1,
            augment=training,
            field=f"data.{split}",
        )

    def _restore(self) -> BatchStream:
        """Resume from the newest checkpoint (when asked and present); the data stream."""
        latest = checkpoint.latest_checkpoint(self.checkpoints) if self.resume else None
        state = checkpoint.read_trainer_state(latest) if latest else None
        stream = BatchStream(
            lambda seed: self._loader("train", seed=seed),
            self.config.data.seed,
            state["stream"] if state else None,
        )
        if state is None:
            return stream
        stream.prime()  # skipping consumed batches may draw from the RNG restored below
        checkpoint.load_checkpoint(
            latest, self.accelerator.process_index, self.model, self.optimizer
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = self.last_saved = state["step"]
        self.best = state.get("best")
        self.nonfinite_total = state.get("nonfinite_total", 0)
        return stream

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.stream = self._restore()
        self.logger = self._open_logger() if self.accelerator.is_main_process else None
        try:
            self._message(self._start_message())
            while self.step < self.total:
                if self._train_step():
                    self._after_step()
            self._finish()
        finally:
            if self.logger is not None:
                self.logger.close(plots=self.config.train.plots)
        return self._result()

    def _open_logger(self) -> RunLogger:
        if self.step > 0:
            truncate_metrics(self.output / "metrics.jsonl", self.step)
        return RunLogger(
            self.output,
            self.total,
            start_step=self.step,
            log_every=self.config.train.log_every,
            tensorboard=self.config.train.tensorboard,
        )

    def _start_message(self) -> str:
        config, accelerator = self.config, self.accelerator
        per_step = config.data.batch_size * config.train.accumulate * accelerator.num_processes
        where = f"resuming at step {self.step}" if self.step else "starting"
        return (
            f"{where}: {self.total} steps of {per_step} samples ({config.data.batch_size} x "
            f"{config.train.accumulate} micro-batches x {accelerator.num_processes} processes) "
            f"on {accelerator.device}, precision {config.train.precision}; output {self.output}"
        )

    def _message(self, text: str) -> None:
        if self.logger is not None:
            self.logger.message(text)

    def _micro_batch(self) -> dict[str, Any]:
        batch = next(self.stream)
        device = self.accelerator.device
        batch["inputs"] = {
            name: None if value is None else self.model.towers[name].move_to(value, device)
            for name, value in batch["inputs"].items()
        }
        batch["present"] = batch["present"].to(device)
        return batch

    def _generator(self) -> torch.Generator:
        device = self.accelerator.device
        generator = torch.Generator(device=device)
        return generator.manual_seed(epoch_seed(self.config.train.seed, self.step))

    def _train_step(self) -> bool:
        """One optimizer step; ``False`` when it was skipped (non-finite loss or gradient)."""
        with self.timer.section("data"):
            micro_batches = [self._micro_batch() for _ in range(self.config.train.accumulate)]
        outcome = accumulated_step(
            self.accelerator, self.step_module, micro_batches, self._generator, self.timer
        )
        grad_norm = math.nan
        finite = outcome.finite
        if finite:
            with self.timer.section("optimizer"):
                grad_norm = self._clip_gradients()
                # fp16: the gradient scaler skips overflowing steps itself
                finite = math.isfinite(grad_norm) or self.config.train.precision == "fp16"
                if finite:
                    self.optimizer.step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._skip(outcome.loss, grad_norm)
            return False
        self.nonfinite_in_row = 0
        self.step += 1
        self.last_loss = outcome.loss
        self.last_objective_metrics = outcome.metrics
        self._interval["loss"] += outcome.loss
        self._interval["grad_norm"] += grad_norm
        self._interval["steps"] += 1
        if self.logger is not None:
            self.logger.advance()
        return True

    def _clip_gradients(self) -> float:
        """Clip to ``train.grad_clip``; the gradient norm (0 where the backend hides it)."""
        max_norm = self.config.train.grad_clip or math.inf
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else 0.0

    def _skip(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient: no update, count it, stop after too many in a row."""
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        limit = self.config.train.max_nonfinite
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        self._message(
            f"step {self.step + 1}: non-finite {what}; step skipped "
            f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all, limit {limit})"
        )
        if self.nonfinite_in_row >= limit:
            last = checkpoint.latest_checkpoint(self.checkpoints)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
            raise TrainingStopped(
                f"training stopped at step {self.step}: {self.nonfinite_in_row} non-finite "
                f"losses/gradients in a row (train.max_nonfinite={limit}); {kept}. Lower "
                "train.lr, raise train.warmup, use precision fp32/bf16 or check the data, "
                "then continue with --resume"
            )

    def _after_step(self) -> None:
        config, step = self.config, self.step
        if self._interval["steps"] and (step % config.train.log_every == 0 or step == self.total):
            self._log_training()
        if step == self.total:
            return
        if config.eval.every and step % config.eval.every == 0:
            self._validate()
        if config.train.save_every and step % config.train.save_every == 0:
            self._save()

    # -- logging, validation, checkpoints ----------------------------------------------------
    def _log_training(self) -> None:
        interval, accelerator = self._interval, self.accelerator
        totals = torch.tensor(
            [interval["loss"], interval["grad_norm"], interval["steps"]],
            device=accelerator.device,
            dtype=torch.float64,
        )
        totals = accelerator.reduce(totals, "mean") if accelerator.num_processes > 1 else totals
        elapsed = time.perf_counter() - interval["start"]
        steps = interval["steps"]
        config = self.config
        samples = (
            steps * config.data.batch_size * config.train.accumulate * accelerator.num_processes
        )
        record = {
            "train/loss": float(totals[0] / steps),
            "train/grad_norm": float(totals[1] / steps),
            "train/temperature": float(self.model.logit_scale_value().detach()),
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/samples_per_s": samples / max(elapsed, 1e-9),
            "train/nonfinite_skipped": self.nonfinite_total,
            "train/epoch": self.stream.epoch,
        }
        record.update({f"train/{k}": v for k, v in self.last_objective_metrics.items()})
        record.update({f"time/{k}": v / steps for k, v in self.timer.pop().items()})
        counters = self._data_counters()
        record.update(counters)
        if self.logger is not None:
            self.logger.log(self.step, record)
            self._report_skipped(counters)
        self._interval = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "start": time.perf_counter()}

    def _data_counters(self) -> dict[str, int]:
        """The loader's record counters summed over processes (``data/seen``, ...)."""
        counters = [self.stream.counters()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            counters = gather_object(counters)
        total: dict[str, int] = {}
        for part in counters:
            for key, value in part.items():
                total[f"data/{key}"] = total.get(f"data/{key}", 0) + int(value)
        return total

    def _report_skipped(self, counters: dict[str, int]) -> None:
        """Say when the loader skipped more records since the last report."""
        skipped = {k: v for k, v in counters.items() if k.startswith("data/skipped/")}
        if sum(skipped.values()) > self._skipped_reported:
            self._skipped_reported = sum(skipped.values())
            reasons = ", ".join(
                f"{k.removeprefix('data/skipped/')} {v}" for k, v in skipped.items()
            )
            self._message(
                f"data: {self._skipped_reported} records skipped so far ({reasons}); "
                "see the warnings above for their shards and keys"
            )

    def _validate(self) -> dict[str, float]:
        metrics = self.validator(self.accelerator, self.model, self._generator)
        self.last_metrics = metrics
        if self.logger is not None and metrics:
            self.logger.log(self.step, metrics)
        self._update_best(metrics)
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        name, mode = self.config.eval.best_metric, self.config.eval.best_mode
        if name not in metrics:
            self._message(
                f"eval.best_metric {name!r} is not among the validation metrics "
                f"({', '.join(sorted(metrics))}); no best checkpoint"
            )
            return
        value = metrics[name]
        previous = None if self.best is None else self.best["value"]
        better = previous is None or (value < previous if mode == "min" else value > previous)
        if math.isfinite(value) and better:
            self.best = {"metric": name, "value": value, "step": self.step}
            saved = self._save()
            if self.accelerator.is_main_process:
                checkpoint.mark_best(saved)
            self.accelerator.wait_for_everyone()
            self._message(f"step {self.step}: new best {name} = {value:.4g}")

    def _trainer_state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stream": self.stream.position(),
            "best": self.best,
            "nonfinite_total": self.nonfinite_total,
            "world_size": self.accelerator.num_processes,
        }

    def _save(self) -> Path:
        path = self.checkpoints / checkpoint.checkpoint_name(self.step)
        if self.last_saved == self.step and path.exists():
            return path
        saved = checkpoint.save_checkpoint(
            self.checkpoints,
            self.step,
            self.accelerator,
            self.model,
            self.optimizer,
            self._trainer_state(),
        )
        if self.accelerator.is_main_process:
            checkpoint.prune_checkpoints(self.checkpoints, self.config.train.keep_last)
        self.last_saved = self.step
        return saved

    def _finish(self) -> None:
        if self.validator is not None:
            self._validate()
        self._save()
        if self.accelerator.is_main_process:
            self._save_model()
            self._message(f"done: {self.step} steps; final model in {self.output / 'model'}")
        self.accelerator.wait_for_everyone()

    def _save_model(self) -> None:
        final, temporary = self.output / "model", self.output / ".tmp-model"
        shutil.rmtree(temporary, ignore_errors=True)
        self.model.save_pretrained(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)

    def _result(self) -> TrainResult:
        best_dir = self.checkpoints / checkpoint.BEST
        return TrainResult(
            output_dir=self.output,
            model_dir=self.output / "model",
            steps=self.step,
            world_size=self.accelerator.num_processes,
            final_loss=self.last_loss,
            metrics=self.last_metrics,
            best_metric=None if self.best is None else self.best["value"],
            best_checkpoint=best_dir if best_dir.exists() else None,
            nonfinite_steps=self.nonfinite_total,
        )


def _finished_result(config: Config, accelerator: Accelerator) -> TrainResult | None:
    """The result of a run that already reached its last step (resume with nothing to do)."""
    output = Path(config.train.output)
    latest = checkpoint.latest_checkpoint(output / "checkpoints")
    if latest is None or not (output / "model").is_dir():
        return None
    state = checkpoint.read_trainer_state(latest)
    if state["step"] < total_steps(config):
        return None
    records = [r for r in read_metrics(output / "metrics.jsonl") if "val/loss" in r]
    best = state.get("best")
    return TrainResult(
        output_dir=output,
        model_dir=output / "model",
        steps=state["step"],
        world_size=accelerator.num_processes,
        final_loss=None,
        metrics={k: v for k, v in (records[-1] if records else {}).items() if k != "step"},
        best_metric=None if best is None else best["value"],
        best_checkpoint=output / "checkpoints" / checkpoint.BEST if best else None,
        nonfinite_steps=state.get("nonfinite_total", 0),
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
    processes with ``accelerate launch -m mmalign train CONFIG``.

    Example:
        >>> result = train("mmalign/demo/configs/demo_digits.yaml", ["train.steps=20"])  # doctest: +SKIP
        >>> AlignmentModel.from_pretrained(result.model_dir)  # doctest: +SKIP
    """
    config = load_config(config, overrides)
    check_run_config(config)
    accelerator = Accelerator(
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
    lock = None
    try:
        lock = _prepare_directory(config, accelerator, resume)
        finished = _finished_result(config, accelerator) if resume else None
        if finished is not None:
            return finished
        trainer = Trainer(config, accelerator, resume)
        if accelerator.is_main_process:
            checkpoint.remove_partial(trainer.checkpoints)
            _write_run_files(config, accelerator, trainer.total)
        accelerator.wait_for_everyone()
        return trainer.run()
    finally:
        if lock is not None:
            lock.release()
        accelerator.end_training()
