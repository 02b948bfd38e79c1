"""What every converter needs: picking a tower by type, a projection as a matrix, and writing
the output folder whole or not at all.

An output folder is marked as the converter's (``.mmalign-convert.json``, naming the format):
``--out`` may be a new path, an empty folder, or a previous output of the same converter,
which is replaced; anything else there (a file, a folder of other files, a run or model
directory, the model being converted) is refused, never renamed or deleted.

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
from mmalign.files import read_json, replace_directory, write_json
from mmalign.model import AlignmentModel


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


MARKER = ".mmalign-convert.json"
"""The file that marks a folder as a converter's output (``{"format": "open_clip"}``)."""


def check_output(directory: str | Path, target: str) -> Path:
    """``directory`` as a :class:`Path` when a ``target`` converter may write there: nothing
    there yet, an empty folder, or a previous ``target`` output (its :data:`MARKER` says so);
    else a :class:`~mmalign.errors.UserError` naming ``--out``.

    Example:
        >>> check_output("/", "onnx")
        Traceback (most recent call last):
        ...
        mmalign.errors.UserError: / is a folder that convert did not write (--out); ...
    """
    final = Path(directory)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise UserError(
            f"{final} exists and is not a folder (--out); convert writes a new folder: "
            "pick a path that does not exist"
        )
    if not final.exists() or not any(final.iterdir()):
        return final
    try:
        marker = read_json(final / MARKER)
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != target:
        found = f"a --to {marker['format']} output" if isinstance(marker, dict) else "other files"
        raise UserError(
            f"{final} is a folder that convert did not write (--out); it holds {found}, which "
            f"convert --to {target} would replace: pick a new or empty folder"
        )
    return final


@contextmanager
def output_directory(directory: str | Path, target: str) -> Iterator[Path]:
    """A temporary folder beside ``directory`` that replaces it when the block succeeds;
    ``directory`` must pass :func:`check_output` for the converter ``target``."""
    final = check_output(directory, target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not mkdtemp (mode 0700): the umask's mode, as a run's directories
    try:
        yield staging
        write_json(staging / MARKER, {"format": target})
        check_output(final, target)  # nothing appeared there while converting
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
