"""What every converter needs: picking a tower by type, a projection as a matrix, and writing
the output folder whole or not at all.

An output folder records the converter that wrote it and its files
(:mod:`mmalign.output_owner`): ``--out`` may be a new path, an empty folder, or a previous
output of the same converter holding nothing else, which is replaced; anything else there (a
file, a folder of other files, a file added to an earlier output, a run or model directory,
the model being converted) is refused, never renamed or deleted.

Example:
    >>> import torch
    >>> projection_matrix(torch.nn.Identity(), "model.projection") is None
    True
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mmalign.errors import UserError
from mmalign.files import replace_directory
from mmalign.model import AlignmentModel
from mmalign.output_owner import Output, check_output, record_output


def pick_tower(
    model: AlignmentModel,
    tower_type: str,
    name: str | None,
    flag: str,
    target: str,
) -> str:
    """The one tower of ``tower_type`` (or ``name``, checked); errors name ``flag``."""
    if name is not None:
        if name not in model.modalities:
            raise UserError(
                f"the model has no modality {name!r} ({flag}); pick one of "
                f"{', '.join(model.modalities)}"
            )
        if model.config.towers[name].type != tower_type:
            raise UserError(
                f"modality {name!r} is a {model.config.towers[name].type} tower, not "
                f"{tower_type} ({flag}); name the {tower_type} tower"
            )
        return name
    found = model.config.modalities_of_type(tower_type)
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(
            f"the model has no {tower_type} tower ({flag}); {target} needs an image and a "
            f"text tower (this model has {', '.join(model.modalities)})"
        )
    raise UserError(
        f"the model has several {tower_type} towers: {', '.join(found)} ({flag}); name one"
    )


def projection_matrix(projection: nn.Module, field: str) -> torch.Tensor | None:
    """The ``[dim, width]`` weight of a linear projection, ``None`` for ``projection: none``;
    an MLP is refused (no single matrix holds it)."""
    if isinstance(projection, nn.Identity):
        return None
    if isinstance(projection, nn.Linear) and projection.bias is None:
        return projection.weight.detach()
    raise UserError(
        f"the projection is an MLP, which no single matrix of the target holds ({field}: mlp); "
        "export it with --to onnx, or train with projection: linear"
    )


def converter_output(target: str) -> Output:
    """The owner of a ``target`` converter's output folder (:mod:`mmalign.output_owner`)."""
    return Output(f"convert --to {target}", "--out", replaced=True)


@contextmanager
def output_directory(directory: str | Path, target: str) -> Iterator[Path]:
    """A temporary folder beside ``directory`` that replaces it when the block succeeds;
    ``directory`` must be new, empty or a previous output of the converter ``target``
    (:func:`~mmalign.output_owner.check_output`), checked again before the replacement."""
    owner = converter_output(target)
    final = check_output(directory, owner)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not mkdtemp (mode 0700): the umask's mode, as a run's directories
    try:
        yield staging
        record_output(staging, owner)
        check_output(final, owner)  # nothing appeared there while converting
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
