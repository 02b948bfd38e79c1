"""The batch every floor passes on: what the loader yields and the model, the objectives,
accumulation, validation and export take.

A :class:`Batch` holds ``B`` samples of the modalities ``modalities`` (in tower order).
``inputs[m]`` is the collated input of the rows that have ``m`` (``None`` when none has it);
``present[i, j]`` says whether row ``i`` has ``modalities[j]``, so ask for a column by name
with :meth:`Batch.present_of`, never by position.

Example:
    >>> import torch
    >>> batch = Batch(keys=["a", "b"], modalities=["image", "text"],
    ...               inputs={"image": torch.zeros(1, 3), "text": torch.zeros(2, 4)},
    ...               present=torch.tensor([[True, True], [False, True]]))
    >>> batch.present_of("image").tolist(), len(batch)
    ([True, False], 2)
    >>> batch.to("cpu").inputs["text"].shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


def move_to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it on ``device``: tensors and objects with ``.to``
    (a PyG batch), and dicts, lists and tuples of them; anything else as it is."""
    if isinstance(value, Tensor) or hasattr(value, "to"):
        return value.to(device)
    if isinstance(value, dict):
        return {key: move_to(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(move_to(item, device) for item in value)
    return value


@dataclass
class Batch:
    """``B`` samples: their keys, collated inputs per modality, and which modalities each has.

    - ``keys``: the record key of each row.
    - ``modalities``: modality names, the column order of ``present``.
    - ``inputs``: modality -> collated input of the present rows, in row order (or ``None``).
    - ``present``: ``BoolTensor[B, M]``.
    - ``labels``: ``LongTensor[B]`` class labels (-1 where a record has none), or ``None``.
    - ``groups``: ``LongTensor[B]`` group ids (rows of one group are positives of each
      other), or ``None`` when the data has no groups.
    - ``item_index``: modality -> ``LongTensor`` with, for each row that has the modality,
      the item of ``inputs[m]`` it uses; rows of one record then share one item, encoded
      once (``data.views: expand``). A modality not in it has one item per present row.
    - ``metadata``: field name -> one value per row.
    - ``counters``: records seen/used/skipped since the previous batch of the same loader
      worker (loader bookkeeping; the :class:`~mmalign.data.Loader` adds them up).
    """

    keys: list[str]
    modalities: list[str]
    inputs: dict[str, Any]
    present: Tensor
    labels: Tensor | None = None
    groups: Tensor | None = None
    item_index: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows, columns = len(self.keys), len(self.modalities)
        if self.present.dtype != torch.bool or tuple(self.present.shape) != (rows, columns):
            raise ValueError(
                f"Batch.present must be a bool tensor [{rows}, {columns}] (rows x modalities "
                f"{self.modalities}); got {self.present.dtype} {tuple(self.present.shape)}"
            )
        for name, values in (("labels", self.labels), ("groups", self.groups)):
            if values is not None and tuple(values.shape) != (rows,):
                raise ValueError(f"Batch.{name} must have shape [{rows}], got {values.shape}")

    def __len__(self) -> int:
        return len(self.keys)

    def present_of(self, modality: str) -> Tensor:
        """``BoolTensor[B]``: the rows that have ``modality`` (a derived key such as
        ``image@teacher`` without its own column: those of ``image``)."""
        if modality not in self.modalities and base_modality(modality) in self.modalities:
            modality = base_modality(modality)
        if modality not in self.modalities:
            raise KeyError(f"the batch has no modality {modality!r}; it has {self.modalities}")
        return self.present[:, self.modalities.index(modality)]

    def present_for(self, modalities: Sequence[str]) -> Tensor:
        """``BoolTensor[B, len(modalities)]``: ``present`` with columns in the given order."""
        return torch.stack([self.present_of(name) for name in modalities], dim=1).reshape(
            len(self), len(modalities)
        )

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with inputs, masks, labels and groups on ``device``."""
        return replace(
            self,
            inputs={name: move_to(value, device) for name, value in self.inputs.items()},
            present=self.present.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            groups=None if self.groups is None else self.groups.to(device),
            item_index={name: index.to(device) for name, index in self.item_index.items()},
        )

    @classmethod
    def empty(cls, modalities: Sequence[str], counters: dict[str, int] | None = None) -> Batch:
        """A batch with no rows (a loader worker's last counters)."""
        return cls(
            keys=[],
            modalities=list(modalities),
            inputs={},
            present=torch.zeros(0, len(modalities), dtype=torch.bool),
            counters=dict(counters or {}),
        )


def base_modality(name: str) -> str:
    """The modality a derived embedding key belongs to: ``"graph@view2"`` -> ``"graph"``.

    Example:
        >>> base_modality("graph@view2"), base_modality("text")
        ('graph', 'text')
    """
    return name.partition("@")[0]


def second_view(modality: str) -> str:
    """The batch column of ``modality``'s second view (the ``two_view`` term's).

    Example:
        >>> second_view("graph")
        'graph@view2'
    """
    return modality + "@view2"
