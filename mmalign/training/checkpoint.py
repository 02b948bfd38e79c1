"""Atomic, pickle-free training checkpoints: save, keep the last K and the best, resume.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding

- ``model.safetensors``: the model's weights;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state, tensors flattened to
  ``state.<param index>.<name>`` and everything else as JSON;
- ``trainer.json``: step, scheduler, gradient scaler, data-stream position, best metric;
- ``rng-rank<r>.safetensors`` + ``rng-rank<r>.json``: the torch, CUDA, numpy and Python RNG
  states of every process.

Under ``train.strategy: fsdp`` the model and optimizer files are replaced by ``sharded/`` and
``sharded.json``, each process writing its own shards
(:mod:`mmalign.training.parallel.sharded_checkpoint`); everything else is the same.

It is written into ``.tmp-step-...`` beside its final place, fsynced, then renamed
(:func:`mmalign.files.replace_directory`), so a directory named ``step-*`` is always
complete. ``best/`` is a hard-linked copy of the checkpoint with the best validation metric,
replaced the same way (the old one renamed to ``.old-best`` first). Old checkpoints are
pruned by renaming them to ``.pruned-step-...`` and then deleting them, so a kill while
pruning never leaves a half-deleted ``step-*``. :func:`recover` (run before a run or resume
reads the directory) deletes leftover temporary, old and pruned directories and brings
``best/`` back when a kill fell between its two renames.

Example:
    >>> from pathlib import Path
    >>> latest_checkpoint(Path("/nonexistent")) is None
    True
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from mmalign.errors import UserError
from mmalign.files import naming_errors, read_json, replace_directory, write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

_PREFIX = "step-"
_PRUNED = ".pruned-"
BEST = "best"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read (corrupt, or not safetensors / JSON)."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at optimizer step ``step``."""
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda path: int(path.name[len(_PREFIX) :]))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (``None`` when there is none)."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def recover(directory: Path) -> None:
    """Undo what a kill left in the checkpoint directory (main process, lock held).

    ``best/`` missing beside ``.old-best`` means the kill came between the two renames of
    :func:`mmalign.files.replace_directory`: the fsynced ``.tmp-best`` becomes ``best/`` (or,
    without one, ``.old-best`` goes back). Then every ``.tmp-*``, ``.old-*`` and
    ``.pruned-*`` directory is deleted.
    """
    if not directory.is_dir():
        return
    best, old_best, new_best = (directory / name for name in (BEST, f".old-{BEST}", f".tmp-{BEST}"))
    if not best.exists() and old_best.is_dir():
        os.replace(new_best if new_best.is_dir() else old_best, best)
    for path in directory.iterdir():
        if path.name.startswith((".tmp-", ".old-", _PRUNED)):
            shutil.rmtree(path, ignore_errors=True)


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into safetensors-ready tensors and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch, CUDA, numpy and Python RNG states (tensors, JSON)."""
    # numpy's stub matches the legacy=False overload (a dict); the default legacy=True
    # returns the MT19937 tuple
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.uint32).astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    python_state = random.getstate()
    meta = {
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    name, position, has_gauss, cached = meta["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, position, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def write_weights(
    directory: Path, accelerator: Accelerator, model: nn.Module, optimizer: Any
) -> None:
    """The whole-tensor weights of a checkpoint: ``model.safetensors``,
    ``optimizer.safetensors`` and ``optimizer.json``, written by the main process."""
    if accelerator.is_main_process:
        with naming_errors(directory / "model.safetensors"):
            save_model(model, str(directory / "model.safetensors"))
        optimizer_tensors, optimizer_meta = flatten_optimizer_state(optimizer.state_dict())
        with naming_errors(directory / "optimizer.safetensors"):
            save_file(optimizer_tensors, directory / "optimizer.safetensors")
        write_json(directory / "optimizer.json", optimizer_meta)


def read_weights(directory: Path, model: nn.Module, optimizer: Any) -> None:
    """Load what :func:`write_weights` wrote into ``model`` and ``optimizer``."""
    sharded = read_json(directory / "sharded.json")
    if sharded is not None:
        raise UserError(
            f"checkpoint {directory} was saved sharded by {sharded['world_size']} processes "
            f"(train.strategy fsdp); resume it with train.strategy fsdp and "
            f"{sharded['world_size']} processes"
        )
    _read(directory / "model.safetensors", lambda file: load_model(model, str(file)))
    meta = _read(directory / "optimizer.json", _read_json)
    tensors = _read(directory / "optimizer.safetensors", load_file)
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))


WeightsWriter = Callable[[Path, Any, nn.Module, Any], None]
WeightsReader = Callable[[Path, nn.Module, Any], None]


def save_checkpoint(
    directory: Path,
    step: int,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    weights: WeightsWriter = write_weights,
    ema: nn.Module | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically; a collective call on every process.

    ``model`` is the unwrapped model; ``trainer_state`` is JSON data (step, scheduler,
    scaler, data position, ...); ``weights`` writes model and optimizer (default
    :func:`write_weights`; sharded:
    :meth:`mmalign.training.parallel.fsdp.FullySharded.write_weights`);
    ``ema``, the weight average (``train.ema``), is written as ``ema.safetensors``.
    Returns the final checkpoint directory.
    """
    final = directory / checkpoint_name(step)
    temporary = directory / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    rng_tensors, rng_meta = capture_rng_state()
    with naming_errors(temporary / f"rng-rank{rank}.safetensors"):
        save_file(rng_tensors, temporary / f"rng-rank{rank}.safetensors")
    write_json(temporary / f"rng-rank{rank}.json", rng_meta)
    weights(temporary, accelerator, model, optimizer)
    if accelerator.is_main_process:
        if ema is not None:
            with naming_errors(temporary / "ema.safetensors"):
                save_model(ema, str(temporary / "ema.safetensors"))
        write_json(temporary / "trainer.json", trainer_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(temporary, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: WeightsReader = read_weights,
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    """Load weights (with ``weights``, default :func:`read_weights`), optimizer, the weight
    average ``ema`` (when given) and this rank's RNG from ``path``; returns ``trainer.json``.

    A rank without its own RNG file (the run was resumed with more processes) keeps its
    seeded RNG.
    """
    weights(path, model, optimizer)
    if ema is not None:
        _read(path / "ema.safetensors", lambda file: load_model(ema, str(file)))
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        rng_meta = _read(path / f"rng-rank{rank}.json", _read_json)
        restore_rng_state(_read(rng_file, load_file), rng_meta)
    return read_trainer_state(path)


def _read_json(path: Path) -> Any:
    """:func:`mmalign.files.read_json`, with a missing file an error."""
    data = read_json(path)
    if data is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    return data


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``; any failure becomes a :class:`CheckpointError` naming the file."""
    try:
        return reader(path)
    except Exception as error:  # safetensors, JSON, shape and OS errors alike
        raise CheckpointError(
            f"cannot read checkpoint file {path}: {error}. Checkpoints hold only safetensors "
            f"and JSON (pickles are never loaded); delete {path.parent} to resume from the "
            "checkpoint before it"
        ) from None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer.json`` of the checkpoint ``path`` (step, scheduler, data position, ...)."""
    return _read(path / "trainer.json", _read_json)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def mark_best(checkpoint: Path) -> Path:
    """Make ``best/`` beside ``checkpoint`` a (hard-linked) copy of it; main process only."""
    directory = checkpoint.parent
    best = directory / BEST
    temporary = directory / f".tmp-{BEST}"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(checkpoint, temporary, copy_function=_link_or_copy)
    return replace_directory(temporary, best)


def prune_checkpoints(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints, each renamed out of the
    ``step-*`` names first; returns the deleted ones."""
    removed = list_checkpoints(directory)[:-keep_last]
    for path in removed:
        retired = path.with_name(f"{_PRUNED}{path.name}")
        os.replace(path, retired)
        shutil.rmtree(retired)
    return removed
