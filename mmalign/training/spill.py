"""Micro-batch inputs parked on disk between the two passes of exact accumulation.

Contrastive-exact accumulation (:mod:`mmalign.training.accumulation`) encodes every
micro-batch of a step once without gradient and again, one at a time, with gradient. Kept in
memory, the inputs of all K micro-batches (images, audio, token ids, graphs) make peak RSS grow
with the global batch. An :class:`InputSpill` writes the tensor leaves of each micro-batch's
inputs to a safetensors file in a temporary directory after its first pass and keeps only the
structure (keys, presence, small non-tensor values) in memory; the second pass loads one
micro-batch back, uses it and drops it. The round trip is bit-exact (same dtype, shape and
values), so the gradients are identical to keeping the inputs in memory. The directory is
removed when the spill is closed (end of the step, or an error).

Tensor leaves are found in dicts, lists and tuples of ``Batch.inputs`` and in PyG
``Data``/``Batch`` objects (their attribute tensors, through ``apply``); other values stay in
memory as they are.

Example:
    >>> import torch
    >>> from mmalign.batch import Batch
    >>> batch = Batch(keys=["a", "b"], modalities=["x"], inputs={"x": torch.arange(6.0).view(2, 3)},
    ...               present=torch.ones(2, 1, dtype=torch.bool))
    >>> with InputSpill() as spill:
    ...     spill.put(0, batch)
    ...     spill.take(0).inputs["x"].tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmalign.batch import Batch
from mmalign.files import naming_errors


class _Graph:
    """Placeholder of a PyG ``Data``/``Batch``: the object with empty tensors, and the
    numbers of its tensors (in ``apply`` order) in the micro-batch's file."""

    __slots__ = ("count", "first", "skeleton")

    def __init__(self, skeleton: Any, first: int, count: int) -> None:
        self.skeleton, self.first, self.count = skeleton, first, count


class _Leaf:
    """Placeholder of a spilled tensor: its number in the micro-batch's file."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number


def _park(tensor: Tensor, leaves: list[Tensor]) -> Tensor:
    """Note ``tensor`` in ``leaves``; an empty stand-in takes its place."""
    leaves.append(tensor)
    return tensor.new_empty(0)


def _strip(value: Any, leaves: list[Tensor]) -> Any:
    """``value`` with each tensor leaf moved into ``leaves`` and replaced by a placeholder."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, dict):
        return {key: _strip(item, leaves) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_strip(item, leaves) for item in value)
    if hasattr(value, "apply") and hasattr(value, "stores"):  # a PyG Data / Batch
        first, skeleton = len(leaves), copy.copy(value)
        # PyG's apply visits the attribute tensors in a fixed order; record them in that order
        skeleton.apply(lambda tensor: _park(tensor, leaves))
        return _Graph(skeleton, first, len(leaves) - first)
    return value


def _restore(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`_strip` with the loaded ``tensors``."""
    if isinstance(value, _Leaf):
        return tensors[str(value.number)]
    if isinstance(value, dict):
        return {key: _restore(item, tensors) for key, item in value.items()}
    if isinstance(value, _Graph):
        rebuilt = copy.copy(value.skeleton)
        numbers = iter(range(value.first, value.first + value.count))
        return rebuilt.apply(lambda _: tensors[str(next(numbers))])
    if isinstance(value, list | tuple):
        return type(value)(_restore(item, tensors) for item in value)
    return value


def _unshared(leaves: list[Tensor]) -> dict[str, Tensor]:
    """Leaves as a safetensors dict: contiguous, and a copy where two share storage."""
    seen: set[int] = set()
    named = {}
    for number, tensor in enumerate(leaves):
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(pointer)
        named[str(number)] = tensor
    return named


def inputs_bytes(batch: Batch) -> int:
    """Bytes of the tensor leaves of ``batch.inputs`` (what spilling would move to disk).

    >>> import torch
    >>> inputs_bytes(Batch(keys=["a"], modalities=["x"], inputs={"x": torch.zeros(1, 4)},
    ...                    present=torch.ones(1, 1, dtype=torch.bool)))
    16
    """
    leaves: list[Tensor] = []
    _strip(batch.inputs, leaves)
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves)


AUTO_BYTES = 64 * 2**20
"""``train.spill_inputs: auto`` spills when a step's inputs would exceed this many bytes."""


def should_spill(setting: bool | str, first: Batch, count: int) -> bool:
    """Whether to spill a step of ``count`` micro-batches like ``first`` (``setting``: True,
    False or ``"auto"``: when ``count > 1`` and their inputs exceed :data:`AUTO_BYTES`).

    >>> import torch
    >>> one = Batch(keys=["a"], modalities=["x"], inputs={"x": torch.zeros(1, 4)},
    ...             present=torch.ones(1, 1, dtype=torch.bool))
    >>> should_spill("auto", one, 3), should_spill(True, one, 3), should_spill(True, one, 1)
    (False, True, False)
    """
    if count < 2 or setting is False:
        return False
    return setting is True or inputs_bytes(first) * count > AUTO_BYTES


class InputSpill:
    """A per-step directory of spilled micro-batch inputs (a context manager; see module doc).

    ``put(index, batch)`` writes the inputs of ``batch`` to disk; ``take(index)`` returns the
    batch with them loaded back (on the device they were on) and forgets the file.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mmalign-spill-", dir=directory))
        self._parked: dict[int, tuple[Batch, torch.device]] = {}

    def _path(self, index: int) -> Path:
        return self.root / f"micro-{index}.safetensors"

    def put(self, index: int, batch: Batch) -> None:
        """Write ``batch``'s input tensors to disk; keep the rest of the batch in memory."""
        leaves: list[Tensor] = []
        skeleton = _strip(batch.inputs, leaves)
        device = leaves[0].device if leaves else torch.device("cpu")
        with naming_errors(self._path(index)):
            save_file(_unshared(leaves), str(self._path(index)))
        self._parked[index] = (replace(batch, inputs=skeleton), device)

    def take(self, index: int) -> Batch:
        """The micro-batch ``index`` with its inputs read back (its file is removed)."""
        parked, device = self._parked.pop(index)
        path = self._path(index)
        tensors = load_file(str(path), device=str(device))
        path.unlink()
        return replace(parked, inputs=_restore(parked.inputs, tensors))

    def close(self) -> None:
        """Remove the directory and everything left in it."""
        self._parked.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> InputSpill:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
