"""What the data pipeline passes along: the :class:`Tower` it preprocesses with, the
:class:`RecordSpec` of what to take from each record, and what a record becomes, a
:class:`Sample` (used) or a :class:`Rejected` (counted, with where and why).

Example:
    >>> Sample("key0", {"labs": [1.0, 2.0]}).label
    -1
    >>> Rejected("skipped/bad_image", "s.tar", "key1", "cannot identify image file").counter
    'skipped/bad_image'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits


class Tower(Protocol):
    """What the data pipeline needs of a tower (:class:`mmalign.towers.Tower` has it)."""

    def preprocess(self, raw: Any, augment: bool = False) -> Any: ...

    def collate(self, items: Sequence[Any]) -> Any: ...


def tower_kind(tower: Any) -> str | None:
    """A tower's config ``type``, which picks the decoder of some files (an mp4 is a video
    for a ``video`` tower, its audio track for an ``audio`` one; see
    :func:`mmalign.data.decode.decode_value`); None for a tower without one.

    Example:
        >>> from types import SimpleNamespace
        >>> tower_kind(SimpleNamespace(config=SimpleNamespace(type="audio"))), tower_kind(None)
        ('audio', None)
    """
    kind = getattr(getattr(tower, "config", None), "type", None)
    return None if kind is None else str(kind)


@dataclass
class Sample:
    """One usable record: preprocessed items of the modalities it has."""

    key: str
    items: dict[str, Any]
    label: int = -1
    metadata: dict[str, Any] = field(default_factory=dict)
    group: int | None = None
    negatives: list[Sample] = field(default_factory=list)
    """Rows of the record's mined negatives (:mod:`mmalign.data.negatives`)."""
    source: str = ""
    """The named source it came from (:mod:`mmalign.data.sources`; empty: unnamed)."""


@dataclass(frozen=True)
class Rejected:
    """A record that was read but not used; ``counter`` is e.g. ``skipped/bad_image``;
    skipped records also say where they were (``url``, ``key``) and what went wrong."""

    counter: str
    url: str = ""
    key: str = ""
    message: str = ""
    source: str = ""


@dataclass
class RecordSpec:
    """What to take from each record: modality fields (tower order), label, metadata, and
    the group and views of :mod:`mmalign.data.views` (``epoch`` is set per pass)."""

    towers: Mapping[str, Tower]
    fields: dict[str, tuple[str, ...]]
    label: tuple[str, ...] | None = None
    metadata: dict[str, tuple[str, ...]] = field(default_factory=dict)
    augment: bool = False
    limits: RecordLimits = DEFAULT_LIMITS
    group: tuple[tuple[str, ...], str | None] | None = None
    views: dict[str, str] = field(default_factory=dict)
    negatives: str | None = None
    seed: int = 0
    epoch: int = 0
    two_view: tuple[str, ...] = ()
    """Modalities that also get a second view (:mod:`mmalign.data.two_views`)."""

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    @property
    def kinds(self) -> dict[str, str | None]:
        """Modality -> the type of its tower (:func:`tower_kind`), which decodes its files."""
        return {name: tower_kind(tower) for name, tower in self.towers.items()}
