"""The weights of a checkpoint saved sharded (``train.strategy: fsdp``).

Inside a checkpoint directory (:mod:`mmalign.training.checkpoint` keeps its atomic rules:
written in ``.tmp-step-*``, renamed, last K kept, ``best/``), the model and optimizer are

- ``sharded/``: a ``torch.distributed.checkpoint`` directory: ``__<rank>_0.distcp`` with each
  process's shards of every parameter and optimizer moment (tensors only), and ``.metadata``
  (which rank holds which piece);
- ``sharded.json``: the strategy, the world size, and the optimizer's non-tensor state
  (hyperparameters, parameter groups by name) as JSON.

Each process writes and reads only its own shards
(:func:`torch.distributed.checkpoint.state_dict.get_state_dict` /
:func:`~torch.distributed.checkpoint.state_dict.set_state_dict`). Resuming needs the same
world size. ``.metadata`` is a pickle written by torch; it is read by
:mod:`~mmalign.training.parallel.checkpoint_metadata` (admitted names only, no import, state set
only on fresh metadata instances, every field checked), so a planted file neither runs code nor
changes anything in the reading process (tensor data is read by torch with
``weights_only=True``).

Example:
    >>> save(directory, model, optimizer, world_size=2)  # doctest: +SKIP
    >>> sorted(p.name for p in directory.iterdir())  # doctest: +SKIP
    ['sharded', 'sharded.json']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mmalign.errors import UserError
from mmalign.files import write_json
from mmalign.training.parallel.checkpoint_metadata import MetadataError, read_metadata

SHARDS = "sharded"
INFO = "sharded.json"
_MODEL, _OPTIMIZER = "model/", "optimizer/"


def _damaged(path: Path, what: str) -> UserError:
    """The error for a damaged file of the checkpoint two levels above ``path``."""
    checkpoint = path.parent.parent
    return UserError(
        f"the checkpoint metadata {what} ({path}); the checkpoint is damaged: remove "
        f"{checkpoint} to resume from the one before it"
    )


class SafeReader(dcp.FileSystemReader):
    """A :class:`~torch.distributed.checkpoint.FileSystemReader` whose metadata is read and
    checked by :func:`~mmalign.training.parallel.checkpoint_metadata.read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                metadata = read_metadata(handle)
        except OSError as error:
            raise _damaged(path, f"cannot be read ({error.strerror})") from None
        except MetadataError as error:
            raise _damaged(path, str(error)) from None
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # checked: a fresh StorageMeta
        return metadata


def _split(model_state: dict, optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flat tensors (``model/<name>``, ``optimizer/<name>/<moment>``) and the optimizer's
    JSON part."""
    tensors = {f"{_MODEL}{name}": value for name, value in model_state.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in optimizer_state["state"].items():
        for moment, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{name}/{moment}"] = value
            else:
                scalars.setdefault(name, {})[moment] = value
    return tensors, {"scalars": scalars, "param_groups": optimizer_state["param_groups"]}


def _join(tensors: dict[str, torch.Tensor], optimizer_json: dict) -> tuple[dict, dict]:
    """Inverse of :func:`_split`."""
    model_state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(_OPTIMIZER):
            name, moment = key[len(_OPTIMIZER) :].rsplit("/", 1)
            state.setdefault(name, {})[moment] = value
    for name, entry in optimizer_json["scalars"].items():
        state.setdefault(name, {}).update(entry)
    return model_state, {"state": state, "param_groups": optimizer_json["param_groups"]}


def save(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int
) -> None:
    """Write this process's shards of ``model`` and ``optimizer`` into ``directory``
    (``sharded/``, ``sharded.json``); a collective call."""
    tensors, optimizer_json = _split(*get_state_dict(model, optimizer))
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory / SHARDS))
    if torch.distributed.get_rank() == 0:
        info = {"strategy": "fsdp", "world_size": world_size, "optimizer": optimizer_json}
        write_json(directory / INFO, info)


def read_info(directory: Path) -> dict[str, Any]:
    """``sharded.json`` of the checkpoint ``directory``; a :class:`~mmalign.errors.UserError`
    when the checkpoint was not saved sharded."""
    path = directory / INFO
    if not path.exists():
        raise UserError(
            f"checkpoint {directory} was not saved sharded (no {INFO}); it comes from a run "
            "with train.strategy ddp: resume it with --set train.strategy=ddp"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} cannot be read ({error}); the checkpoint is damaged: remove {directory} "
            "to resume from the one before it"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("world_size"), int):
        raise UserError(
            f"{path} holds no world_size; the checkpoint is damaged: remove {directory} to "
            "resume from the one before it"
        )
    return info


def load(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int
) -> None:
    """Read this process's shards from ``directory`` into ``model`` and ``optimizer``; a
    collective call. The checkpoint must come from ``world_size`` processes."""
    info = read_info(directory)
    if info["world_size"] != world_size:
        raise UserError(
            f"checkpoint {directory} was saved sharded by {info['world_size']} processes "
            f"(train.strategy fsdp) and this run has {world_size}; resume with "
            f"{info['world_size']} processes, or start a new run (train.output)"
        )
    template, _ = _split(*get_state_dict(model, optimizer))
    reader = SafeReader(directory / SHARDS)
    reader.read_metadata()  # DCP words a damaged .metadata as an AssertionError: ours first
    dcp.load(template, storage_reader=reader)
    model_state, optimizer_state = _join(template, info["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
