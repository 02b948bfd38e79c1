"""The step loop of a run: contrastive-exact steps, non-finite handling, logs, validation,
checkpoints. :func:`mmalign.training.train` builds a :class:`Trainer` and runs it.

One optimizer step reads ``train.accumulate`` micro-batches from the :class:`EpochStream`,
moves them to the device, and runs :func:`accumulated_step`; a step whose loss or gradient
is not finite is skipped (no update, counted), and ``train.max_nonfinite`` skips in a row
stop the run with :class:`TrainingStopped`. After every step the parameters, the
temperature and the normalization statistics are checked (:mod:`mmalign.training.health`):
a step that leaves any of them non-finite or beyond ``train.max_abs_weight`` stops the run
as diverged, before anything of it is saved. On SIGTERM/SIGINT (see
:mod:`mmalign.training.signals`) the current step is finished and saved, then
:class:`TrainingInterrupted` is raised. Every ``train.log_every`` steps the training
metrics are logged, every ``eval.every`` steps the model is validated, every
``train.save_every`` steps (and at each new best validation metric) a checkpoint is saved.

Example:
    >>> trainer = Trainer(config, Accelerator(), resume=False)  # doctest: +SKIP
    >>> with trainer.logs():  # doctest: +SKIP
    ...     trainer.run()
    >>> trainer.step == trainer.total  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import chain
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from mmalign.batch import Batch
from mmalign.config import Config
from mmalign.data import Loader, loader_from_config
from mmalign.model import AlignmentModel
from mmalign.training import checkpoint
from mmalign.training.accumulation import ContrastiveStep, accumulated_step
from mmalign.training.checks import total_steps
from mmalign.training.ema import attach_ema
from mmalign.training.health import divergence_message, suggested_lr, unhealthy_tensor
from mmalign.training.host_memory import HostMemory
from mmalign.training.logging import RunLogger, truncate_metrics
from mmalign.training.memory_savers import apply_memory_savers
from mmalign.training.optim import build_optimizer, build_scheduler
from mmalign.training.parallel import build_strategy
from mmalign.training.parallel.base import describe_run, run_summary
from mmalign.training.resume import apply_optimizer_settings
from mmalign.training.sample_keys import SampleKeyLog
from mmalign.training.signals import StopSignals, TrainingInterrupted
from mmalign.training.spill import InputSpill, should_spill
from mmalign.training.stream import EpochStream, epoch_seed
from mmalign.training.terms import end_step, load_teacher, two_view_modalities
from mmalign.training.timing import StepTimer
from mmalign.training.validation import Validator


class TrainingStopped(RuntimeError):
    """Training stopped early: too many non-finite losses in a row, or diverged weights.

    Example:
        >>> isinstance(TrainingStopped("stopped at step 3"), RuntimeError)
        True
    """


class Trainer:
    """One training run: the model, optimizer, data stream and the step loop.

    The constructor builds everything and, with ``resume``, restores the newest checkpoint
    of ``train.output/checkpoints``. :meth:`run` trains to the last step (inside
    :meth:`logs` for the main process's logs); :meth:`state` is what checkpoints store.
    """

    def __init__(
        self,
        config: Config,
        accelerator: Accelerator,
        resume: bool,
        signals: StopSignals | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.signals = signals
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
        self.logger: RunLogger | None = None
        self.host_memory: HostMemory | None = None
        self._skipped_reported = 0
        self._interval = self._new_interval()
        self._build()
        self.stream = self._restore(resume)

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        config, accelerator = self.config, self.accelerator
        set_seed(config.train.seed)
        model = AlignmentModel.from_config(config.model)
        set_seed(config.train.seed, device_specific=True)
        self.strategy = build_strategy(config, accelerator)
        self.step_module, self.optimizer = self.strategy.prepare(
            ContrastiveStep(model, load_teacher(model)),
            lambda module: build_optimizer(module, config.train),
        )
        unwrapped = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's wrapper
        self.scheduler = build_scheduler(unwrapped, config.train, self.total)
        self.model: AlignmentModel = accelerator.unwrap_model(self.step_module).model
        self.ema = attach_ema(self.model, self.optimizer, config.train.ema)
        # validated and saved: the model or its average (AveragedModel holds a deep copy of it)
        self.final_model = self.model if self.ema is None else cast(AlignmentModel, self.ema.module)
        apply_memory_savers(self.model, config.train)
        self.step_module.train()
        self.validator = Validator(config) if config.data.val else None
        synchronize = (
            torch.cuda.synchronize
            if config.train.profile and accelerator.device.type == "cuda"
            else None
        )
        self.timer = StepTimer(synchronize)

    def _train_loader(self, seed: int) -> Loader:
        """This rank's loader of one training epoch (no labels: training does not use them)."""
        return loader_from_config(
            self.config.data,
            self.model.towers,
            "train",
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            seed=seed,
            label_field=None,
            two_view=two_view_modalities(self.config.model.objective.terms),
        )

    def _restore(self, resume: bool) -> EpochStream:
        """Resume from the newest checkpoint (when asked and present); the data stream."""
        latest = checkpoint.latest_checkpoint(self.checkpoints) if resume else None
        state = checkpoint.read_trainer_state(latest) if latest is not None else None
        position = state["stream"] if state else None
        on_batch = None
        if self.config.train.log_sample_keys:
            on_batch = SampleKeyLog(self.output, self.accelerator.process_index, position)
        stream = EpochStream(self._train_loader, self.config.data.seed, position, on_batch)
        if state is None or latest is None:
            return stream
        stream.prime()  # skipping consumed batches may draw from the RNG restored below
        self.strategy.load_checkpoint(latest, self.model, self.optimizer, self.ema)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(self.optimizer, self.scheduler, self.config.train)
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = self.last_saved = state["step"]
        self.best = state.get("best")
        self.nonfinite_total = state.get("nonfinite_total", 0)
        return stream

    @contextmanager
    def logs(self) -> Iterator[None]:
        """The main process's logs for the ``with`` block (records after a resumed step are
        dropped first); closed after it, with the plots when ``train.plots``."""
        torn = None
        if self.accelerator.is_main_process:
            torn = truncate_metrics(self.output / "metrics.jsonl", self.step)
            self.logger = RunLogger(
                self.output,
                self.total,
                start_step=self.step,
                log_every=self.config.train.log_every,
                trackers=self.accelerator if self.config.train.tensorboard else None,
            )
            if torn:
                self.message(torn)
        try:
            yield
        finally:
            if self.logger is not None:
                self.logger.close(plots=self.config.train.plots)
                self.logger = None

    def message(self, text: str) -> None:
        """Print and log ``text`` (main process; the others say nothing)."""
        if self.logger is not None:
            self.logger.message(text)

    def _note(self, text: str | None) -> None:
        if text is not None:
            self.message(text)

    def _stop(self, text: str) -> TrainingStopped:
        """:class:`TrainingStopped` with ``text``, which also goes to ``train.log`` (the
        command line prints it)."""
        if self.logger is not None:
            self.logger.message(text, echo=False)
        return TrainingStopped(text)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, host_memory: HostMemory | None = None) -> None:
        """Train to the last step and save its checkpoint (before the last validation, so a
        failure there never loses the trained weights); a collective call. ``host_memory``:
        the allocator's settings (:func:`mmalign.training.host_memory.host_memory`), told
        when a step spills its inputs."""
        self.host_memory = host_memory
        self.message(self._start_message())
        while self.step < self.total:
            self._stop_if_signalled()
            if self._train_step():
                self._after_step()
        self._stop_if_signalled()
        self._save()

    def validate_last(self) -> None:
        """Validate the trained model (with ``data.val``; a new best marks the last
        checkpoint ``best/``); a collective call, after the model is saved."""
        if self.validator is not None:
            self._validate(self.validator)

    def _stop_if_signalled(self) -> None:
        """After SIGTERM/SIGINT (on any process): save this step's checkpoint and raise
        :class:`TrainingInterrupted`."""
        received = self.signals.received if self.signals is not None else None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([received or 0], device=self.accelerator.device)
            received = int(self.accelerator.reduce(flag, "max")) or None
        if received is None:
            return
        saved = self._save()
        name = signal.Signals(received).name
        message = (
            f"{name}: stopped after step {self.step} of {self.total}; checkpoint {saved}; "
            "continue with --resume"
        )
        if self.logger is not None:
            self.logger.message(message, echo=False)  # the command line prints it
        raise TrainingInterrupted(received, message)

    def _start_message(self) -> str:
        config, accelerator = self.config, self.accelerator
        where = f"resuming at step {self.step}" if self.step else "starting"
        train, processes = config.train, accelerator.num_processes
        ran = run_summary(describe_run(train.strategy, train.precision, processes))
        return (
            f"{where}: {self.total} steps of {self._samples_per_step()} samples "
            f"({config.data.batch_size} x {train.accumulate} micro-batches x {processes} "
            f"processes) on {accelerator.device}: {ran}; output {self.output}"
        )

    def _samples_per_step(self) -> int:
        data, train = self.config.data, self.config.train
        return data.batch_size * train.accumulate * self.accelerator.num_processes

    def _micro_batch(self) -> Batch:
        """The next micro-batch of the stream, on the device."""
        return next(self.stream).to(self.accelerator.device)

    def _micro_batches(self, count: int) -> Iterator[Batch]:
        """The next ``count`` micro-batches, read one at a time as the step asks for them."""
        for _ in range(count):
            with self.timer.section("data"):
                batch = self._micro_batch()
            yield batch

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.accelerator.device)
        return generator.manual_seed(epoch_seed(self.config.train.seed, self.step))

    def _train_step(self) -> bool:
        """One optimizer step; ``False`` when it was skipped (non-finite loss or gradient)."""
        with self.timer.section("data"):
            first = self._micro_batch()
        count = self.config.train.accumulate
        spilling = should_spill(self.config.train.spill_inputs, first, count)
        if spilling and self.host_memory is not None:
            self._note(self.host_memory.spilling())
        with InputSpill() if spilling else nullcontext() as spill:
            micro_batches = chain([first], self._micro_batches(count - 1))
            del first
            step = (self.accelerator, self.step_module, micro_batches, self._generator, self.timer)
            outcome = accumulated_step(*step, self.strategy.no_sync, spill)
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
                    end_step(self.model)
                self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self._check_health()
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

    def _check_health(self) -> None:
        """Stop as diverged when a parameter, the temperature or a normalization statistic
        is non-finite or beyond ``train.max_abs_weight`` (nothing of this state is saved)."""
        train, accelerator = self.config.train, self.accelerator
        found = unhealthy_tensor(self.model, train.max_abs_weight)
        if accelerator.num_processes > 1:  # every rank stops (statistics may differ per rank)
            flag = torch.tensor([float(found is not None)], device=accelerator.device)
            if float(accelerator.reduce(flag, "max")) and found is None:
                found = ("(on another process)", math.nan)
        if found is not None:
            last = checkpoint.latest_checkpoint(self.checkpoints)
            raise self._stop(divergence_message(self.step + 1, *found, train, last))

    def _clip_gradients(self) -> float:
        """Clip to ``train.grad_clip``; the gradient norm (0 where the backend hides it)."""
        max_norm = self.config.train.grad_clip or math.inf
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return self.strategy.clip_gradients(parameters, max_norm)

    def _skip(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient: no update, count it, stop after too many in a row."""
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        limit = self.config.train.max_nonfinite
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        self.message(
            f"step {self.step + 1}: non-finite {what}; step skipped "
            f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all, limit {limit})"
        )
        if self.nonfinite_in_row >= limit:
            last = checkpoint.latest_checkpoint(self.checkpoints)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
            raise self._stop(
                f"training stopped at step {self.step}: {self.nonfinite_in_row} non-finite "
                f"losses/gradients in a row (train.max_nonfinite={limit}); {kept}. Lower "
                f"train.lr (--resume --set train.lr={suggested_lr(self.config.train.lr):g}), "
                "raise train.warmup, use precision fp32/bf16 or check the data, then continue "
                "with --resume"
            )

    def _after_step(self) -> None:
        config, step = self.config, self.step
        if self._interval["steps"] and (step % config.train.log_every == 0 or step == self.total):
            self._log_training()
        if step == self.total:
            return
        if self.validator is not None and config.eval.every and step % config.eval.every == 0:
            self._validate(self.validator)
        if config.train.save_every and step % config.train.save_every == 0:
            self._save()

    # -- logging, validation, checkpoints ----------------------------------------------------
    @staticmethod
    def _new_interval() -> dict[str, float]:
        return {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "start": time.perf_counter()}

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
        record = {
            "train/loss": float(totals[0] / steps),
            "train/grad_norm": float(totals[1] / steps),
            "train/temperature": 1.0 / float(self.model.logit_scale_value().detach()),
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/samples_per_s": steps * self._samples_per_step() / max(elapsed, 1e-9),
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
        self._interval = self._new_interval()

    def _data_counters(self) -> dict[str, int]:
        """The loader's record counters summed over processes (``data/seen``, ...)."""
        counters = [self.stream.counters()]
        if self.accelerator.num_processes > 1:
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
            self.message(
                f"data: {self._skipped_reported} records skipped so far ({reasons}); "
                "see the warnings above for their shards and keys"
            )

    def _validate(self, validator: Validator) -> dict[str, float]:
        metrics = validator(self.accelerator, self.final_model, self._generator)
        self.last_metrics = metrics
        if self.logger is not None and metrics:
            self.logger.log(self.step, metrics)
        self._update_best(metrics)
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        name, mode = self.config.eval.best_metric, self.config.eval.best_mode
        if name not in metrics:
            self.message(
                f"eval.best_metric {name!r} is not among the validation metrics "
                f"({', '.join(sorted(metrics))}); no best checkpoint"
            )
            return
        value = metrics[name]
        previous = None if self.best is None else self.best["value"]
        better = previous is None or (value < previous if mode == "min" else value > previous)
        if math.isfinite(value) and better:
            self.best = {"metric": name, "value": value, "step": self.step}
            saved = self._save(again=True)
            if self.accelerator.is_main_process:
                checkpoint.mark_best(saved)
            self.accelerator.wait_for_everyone()
            self.message(f"step {self.step}: new best {name} = {value:.4g}")

    def state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint (``trainer.json``): step, scheduler, scaler,
        data-stream position, best metric, non-finite steps, world size."""
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

    def _save(self, again: bool = False) -> Path:
        """The checkpoint of this step, written unless it was already (or ``again``: its
        ``trainer.json`` must hold a new best metric)."""
        path = self.checkpoints / checkpoint.checkpoint_name(self.step)
        if self.last_saved == self.step and path.exists() and not again:
            return path
        saved = self.strategy.save_checkpoint(
            self.checkpoints, self.step, self.model, self.optimizer, self.state(), self.ema
        )
        if self.accelerator.is_main_process:
            checkpoint.prune_checkpoints(self.checkpoints, self.config.train.keep_last)
        self.last_saved = self.step
        return saved
