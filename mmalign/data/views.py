"""Groups and several views per record: ``data.group_field`` and ``data.views``.

* ``data.group_field`` names the record file holding the record's group (``cls``, ``txt``,
  ``json:patient`` for one key of a JSON object). Integers (and decimal strings) are the group
  id; other strings are hashed stably (BLAKE2b, 8 bytes) to an int64, the same in every
  process and run. A record without the file is its own group (its key, hashed).
* ``data.views: {text: sample}``: a record holding several items of a modality (a JSON list,
  or ``txt``, ``1.txt``, ``2.txt`` ...) gives one of them per pass, picked by a hash of
  ``data.seed``, the epoch, the key and the modality (reproducible, different each epoch).
* ``data.views: {text: expand}``: the record gives one row per item; the rows share one group
  (``group_field``'s, else the record's own) and the record's other modalities are
  preprocessed and encoded once (``Batch.item_index`` maps the rows to that one item).
  ``data.batch_size`` then counts records, so a batch may hold more rows. Training only:
  validation and test read the first item.

Example:
    >>> group_id("patient-7") == group_id("patient-7"), group_id(12), group_id(" 12\\n")
    (True, 12, 12)
    >>> raw = {"__key__": "k", "__url__": "s.tar", "txt": b"a", "2.txt": b"c", "1.txt": b"b"}
    >>> [value for _, value in modality_items(raw, ("txt",))]
    ['a', 'b', 'c']
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.batch import Batch
from mmalign.data.decode import RecordError, decode_value, find_file
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.samples import RecordSpec, Sample
from mmalign.errors import ConfigError

_INT64 = 2**63
_NUMBERED = re.compile(r"^(\d+)\.(.+)$")


def stable_hash(text: str) -> int:
    """A signed int64 of ``text`` that every process and run agrees on (unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def group_id(value: Any) -> int:
    """The int64 group of a decoded field value: an integer as it is, a string hashed."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RecordError("bad_group", f"a group must be an integer or a string, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            return stable_hash(text)
        value = int(text)
    if not -_INT64 <= value < _INT64:
        raise RecordError("bad_group", f"group {value} does not fit in int64")
    return value


def parse_group_field(spec: str) -> tuple[tuple[str, ...], str | None]:
    """``"json:patient"`` -> ``(("json",), "patient")``; ``"cls"`` -> ``(("cls",), None)``."""
    extensions, _, key = spec.partition(":")
    return tuple(part.strip().lstrip(".").lower() for part in extensions.split(";")), key or None


def record_group(
    raw: Mapping[str, Any],
    spec: tuple[tuple[str, ...], str | None],
    limits: RecordLimits = DEFAULT_LIMITS,
) -> int:
    """The group of a raw record (its hashed key when the group file is absent)."""
    alternatives, key = spec
    extension = find_file(raw, alternatives)
    if extension is None:
        return stable_hash(f"record:{raw['__url__']}:{raw['__key__']}")
    value = decode_value(extension, raw[extension], limits)
    if key is not None:
        if not isinstance(value, dict) or key not in value:
            raise RecordError("bad_group", f".{extension} has no key {key!r}")
        value = value[key]
    return group_id(value)


def modality_items(
    raw: Mapping[str, Any],
    alternatives: Sequence[str],
    limits: RecordLimits = DEFAULT_LIMITS,
    kind: str | None = None,
) -> list[tuple[str, Any]]:
    """Every item of one modality in a raw record, decoded as its tower's type ``kind`` reads
    them (an mp4 as a video, or as an ``audio`` tower's audio track): the plain file first,
    then ``1.<ext>``, ``2.<ext>`` ... in number order; a JSON list counts as its elements."""
    found = []
    for name in raw:
        if name.startswith("__"):
            continue
        numbered = _NUMBERED.match(name)
        extension = numbered.group(2) if numbered else name
        if extension in alternatives:
            order = int(numbered.group(1)) if numbered else -1
            found.append((order, alternatives.index(extension), name))
    items: list[Any] = []
    for _, _, name in sorted(found):
        value = decode_value(name, raw[name], limits, kind)
        values = value if isinstance(value, list) else [value]
        items.extend((name, item) for item in values)
    return items


def check_views(views: Mapping[str, str], modalities: Sequence[str]) -> dict[str, str]:
    """``data.views`` checked against the towers: known modes, at most one ``expand``."""
    for modality, mode in views.items():
        if modality not in modalities:
            raise ConfigError(
                f"data.views.{modality}: no tower named {modality!r}; use one of {list(modalities)}"
            )
        if mode not in ("sample", "expand", "first"):
            raise ConfigError(f"data.views.{modality}: {mode!r} is not sample or expand")
    if list(views.values()).count("expand") > 1:
        raise ConfigError("data.views: at most one modality can be 'expand'; sample the others")
    return dict(views)


def pick_index(count: int, seed: int, epoch: int, key: str, modality: str) -> int:
    """Which of ``count`` items ``sample`` takes this epoch (a stable hash, not ``random``)."""
    return stable_hash(f"{seed}:{epoch}:{key}:{modality}") % count


@dataclass
class Views:
    """The items of an ``expand`` modality of one record (one row each), decoded or
    preprocessed."""

    items: list[Any]


def sample_group(raw: Mapping[str, Any], spec: RecordSpec) -> int | None:
    """The record's group: ``group_field``'s, its own when it has none or a modality is
    expanded, ``None`` when the data has no groups."""
    if spec.group is not None:
        return record_group(raw, spec.group, spec.limits)
    if "expand" in spec.views.values():
        return stable_hash(f"record:{raw['__url__']}:{raw['__key__']}")
    return None


def decode_views(raw: Mapping[str, Any], spec: RecordSpec) -> dict[str, Any]:
    """The decoded values of the modalities with a ``views`` mode (others are left out):
    one item for ``sample`` / ``first``, a :class:`Views` for ``expand``."""
    values: dict[str, Any] = {}
    for modality, mode in spec.views.items():
        found = modality_items(raw, spec.fields[modality], spec.limits, spec.kinds[modality])
        items = [item for _, item in found]
        if not items:
            continue
        if mode == "expand":
            values[modality] = Views(items)
        elif mode == "sample":
            index = pick_index(len(items), spec.seed, spec.epoch, raw["__key__"], modality)
            values[modality] = items[index]
        else:
            values[modality] = items[0]
    return values


def _rows(sample: Sample) -> int:
    return max((len(v.items) for v in sample.items.values() if isinstance(v, Views)), default=1)


def collate_expanded(samples: list[Sample], spec: RecordSpec) -> Batch:
    """Samples whose ``expand`` modality holds a list of items to one row per item; the other
    modalities keep one item per record, reused through ``Batch.item_index``."""
    modalities = spec.modalities
    rows = [_rows(sample) for sample in samples]
    record_of = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(rows))
    present = torch.tensor(
        [[m in samples[r].items for m in modalities] for r in record_of.tolist()], dtype=torch.bool
    ).reshape(len(record_of), len(modalities))
    inputs: dict[str, Any] = {}
    item_index: dict[str, torch.Tensor] = {}
    for modality in modalities:
        holders = [s for s in samples if modality in s.items]
        if not holders:
            inputs[modality] = None
        elif isinstance(holders[0].items[modality], Views):
            items = [item for s in holders for item in s.items[modality].items]
            inputs[modality] = spec.towers[modality].collate(items)
        else:
            inputs[modality] = spec.towers[modality].collate([s.items[modality] for s in holders])
            position = torch.cumsum(torch.tensor([modality in s.items for s in samples]), 0) - 1
            index = position[record_of][present[:, modalities.index(modality)]]
            if len(index) != len(holders):
                item_index[modality] = index
    labels = None
    if spec.label is not None:
        labels = torch.tensor([samples[r].label for r in record_of.tolist()], dtype=torch.long)
    return Batch(
        keys=[samples[r].key for r in record_of.tolist()],
        modalities=modalities,
        inputs=inputs,
        present=present,
        labels=labels,
        groups=torch.tensor([samples[r].group for r in record_of.tolist()], dtype=torch.long),
        item_index=item_index,
        metadata={
            name: [samples[r].metadata.get(name) for r in record_of.tolist()]
            for name in spec.metadata
        },
    )
