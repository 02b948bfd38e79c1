"""Records to batches: decode, the towers' ``preprocess``, and ``collate`` with presence masks.

Everything here runs inside DataLoader workers. Accounting travels with the data: every
batch carries ``counters``, the counts of records seen, used, skipped (by reason) and dropped
since the previous batch of the same worker, so the main process can add them up; beside
each batch, :func:`batches` hands on the skipped records (shard, key, reason, message) so the
main process can log them where the run's log is. A worker's last message may be a batch
with no rows that only carries counters.

Example:
    >>> from mmalign.towers import build_tower
    >>> spec = RecordSpec({"labs": build_tower({"type": "tabular", "in_features": 2})},
    ...     fields={"labs": ("npy",)})
    >>> item = spec.towers["labs"].preprocess([1.0, 2.0])
    >>> collate_samples([Sample("key0", {"labs": item})], spec).present
    tensor([[True]])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from mmalign.batch import Batch, base_modality, second_view
from mmalign.data.decode import RecordError, as_label, decode_fields, decode_value, find_file
from mmalign.data.negatives import negative_items
from mmalign.data.samples import RecordSpec, Rejected, Sample
from mmalign.data.two_views import augmented_views
from mmalign.data.views import Views, collate_expanded, decode_views, sample_group
from mmalign.errors import SampleError


def _preprocess_all(values: dict[str, Any], spec: RecordSpec, key: str = "") -> dict[str, Any]:
    items = {}
    for modality, value in values.items():
        tower = spec.towers[modality]
        try:
            if isinstance(value, Views):
                items[modality] = Views(
                    [tower.preprocess(v, augment=spec.augment) for v in value.items]
                )
                continue
            if modality in spec.two_view:
                items[modality], items[second_view(modality)] = augmented_views(
                    tower, value, key, modality, spec.seed, spec.epoch
                )
                continue
            items[modality] = tower.preprocess(value, augment=spec.augment)
        except SampleError as error:  # a refusal with a reason of its own (nonfinite ...)
            raise RecordError(error.reason, f"tower {modality!r}: {error}") from None
        except Exception as error:  # one record never takes the run down
            raise RecordError(
                "preprocess", f"tower {modality!r}: {type(error).__name__}: {error}"
            ) from None
    return items


def _label(raw: Mapping[str, Any], spec: RecordSpec) -> int:
    extension = find_file(raw, spec.label) if spec.label else None
    if extension is None:
        return -1
    value = decode_value(extension, raw[extension], spec.limits)
    try:
        return as_label(value)
    except (TypeError, ValueError):
        raise RecordError(
            "bad_label", f".{extension} holds {value!r}, not an int64 integer"
        ) from None


def to_sample(raw: Mapping[str, Any], spec: RecordSpec) -> Sample | Rejected:
    """Decode and preprocess one raw record; a failure becomes :class:`Rejected` with its
    reason, shard and key."""
    key, url = raw["__key__"], raw["__url__"]
    try:
        if "__error__" in raw:
            raise RecordError(*raw["__error__"])
        plain = {
            name: alts
            for name, alts in spec.fields.items()
            if name not in spec.views and base_modality(name) == name
        }
        values = {**decode_fields(raw, plain, spec.limits, spec.kinds), **decode_views(raw, spec)}
        if not values:
            return Rejected("dropped/no_modality")
        label = _label(raw, spec)
        metadata = decode_fields(raw, spec.metadata, spec.limits)
        group = sample_group(raw, spec)
        negatives = _negatives(raw, spec)
        return Sample(key, _preprocess_all(values, spec, key), label, metadata, group, negatives)
    except RecordError as error:
        return Rejected(f"skipped/{error.reason}", url, key, error.detail)


def _negatives(raw: Mapping[str, Any], spec: RecordSpec) -> list[Sample]:
    if spec.negatives is None:
        return []
    modality = spec.negatives
    return [
        Sample(f"{raw['__key__']}/{name}", _preprocess_all({modality: value}, spec), group=group)
        for name, value, group in negative_items(
            raw, spec.fields[modality], spec.limits, spec.kinds[modality]
        )
    ]


def take_samples(entries: Iterable[Sample | Rejected], count: int | None) -> Iterator:
    """Pass entries through until ``count`` samples went by (all of them when None)."""
    taken = 0
    if count is not None and count <= 0:
        return
    for entry in entries:
        yield entry
        if isinstance(entry, Sample):
            taken += 1
            if count is not None and taken >= count:
                return


def collate_samples(samples: list[Sample], spec: RecordSpec) -> Batch:
    """A list of samples to a :class:`~mmalign.batch.Batch` (modalities in tower order); a
    sample's mined negatives follow it as rows."""
    samples = [row for sample in samples for row in (sample, *sample.negatives)]
    if "expand" in spec.views.values():
        return collate_expanded(samples, spec)
    modalities = spec.modalities
    present = torch.tensor(
        [[modality in sample.items for modality in modalities] for sample in samples],
        dtype=torch.bool,
    ).reshape(len(samples), len(modalities))
    inputs = {}
    for modality in modalities:
        rows = [sample.items[modality] for sample in samples if modality in sample.items]
        inputs[modality] = spec.towers[modality].collate(rows) if rows else None
    labels = None
    if spec.label is not None:
        labels = torch.tensor([sample.label for sample in samples], dtype=torch.long)
    return Batch(
        keys=[sample.key for sample in samples],
        modalities=modalities,
        inputs=inputs,
        present=present,
        labels=labels,
        groups=None
        if spec.group is None
        else torch.tensor([sample.group for sample in samples], dtype=torch.long),
        metadata={name: [item.metadata.get(name) for item in samples] for name in spec.metadata},
    )


def _count_used(counts: Counter[str], samples: list[Sample]) -> None:
    """Add ``samples`` to ``used`` and to their sources' ``<source>/used``."""
    counts["used"] += len(samples)
    counts.update(f"{sample.source}/used" for sample in samples if sample.source)


def batches(
    entries: Iterable[Sample | Rejected],
    spec: RecordSpec,
    batch_size: int,
    drop_last: bool = False,
) -> Iterator[tuple[Batch, list[Rejected]]]:
    """Group samples into collated batches that carry their counter deltas; each comes with
    the records skipped since the previous one (each record once per epoch)."""
    pending: list[Sample] = []
    counts: Counter[str] = Counter()
    skipped: list[Rejected] = []
    reported: set[tuple[str, str, str]] = set()
    for entry in entries:
        counts["seen"] += 1
        if entry.source:
            counts[f"{entry.source}/seen"] += 1
        if isinstance(entry, Rejected):
            counts[entry.counter] += 1
            if entry.source:
                counts[f"{entry.source}/{entry.counter}"] += 1
            where = (entry.url, entry.key, entry.counter)
            if entry.key and where not in reported:
                reported.add(where)
                skipped.append(entry)
            continue
        pending.append(entry)
        if len(pending) == batch_size:
            _count_used(counts, pending)
            batch = collate_samples(pending, spec)
            batch.counters = dict(counts)
            yield batch, skipped
            pending, counts, skipped = [], Counter(), []
    if pending and not drop_last:
        _count_used(counts, pending)
        batch = collate_samples(pending, spec)
        batch.counters = dict(counts)
        yield batch, skipped
    elif counts or pending:
        counts["dropped/last_batch"] += len(pending)
        yield Batch.empty(spec.modalities, dict(+counts)), skipped
