"""The training/evaluation loader: WebDataset shards in, batches with presence masks out.

Per DataLoader worker: shards of this split (rank x worker) -> raw records (tar members up to
``data.max_member_bytes``; several sources mixed by weight, :mod:`mmalign.data.sources`;
URL shards retried, :mod:`mmalign.data.remote`) -> shuffle buffer -> per-extension decode
(within the per-record limits) -> the towers' ``preprocess`` -> batches through the towers'
``collate``. The main process adds up the counters each batch carries (``<source>/...`` per
named source, ``faults/...`` per failed shard read) and logs each skipped record with its
shard and key (logger ``mmalign.data``; a training run writes it to ``train.log``). Finite
epochs keep a resume mark (:meth:`Loader.resume_mark`) that a resumed run hands to
:meth:`Loader.fast_forward` (:mod:`mmalign.data.resume`).

An epoch that yields no batch raises :class:`NoUsableData` naming the shards and the
counters. A resampled stream (endless) raises it too, instead of spinning, once a worker has
read each shard through without a usable record (:mod:`mmalign.data.survey`). With
``require_modalities`` (training), a modality that no usable record has (a ``data.fields``
typo) raises it as well: in a resampled stream once each shard was read through, otherwise at
the end of a whole epoch of a single process.

Example:
    >>> loader = make_loader("data/digits/train-{000000..000007}.tar", towers,
    ...     {"image": "png", "text": "txt"}, batch_size=64, workers=2)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP
    >>> batch.present.shape, loader.counters["seen"]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from types import EllipsisType
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from mmalign.batch import Batch, base_modality, second_view
from mmalign.config import ConfigError, DataConfig, DataSource
from mmalign.config.extensions import parse_alternatives
from mmalign.data.batching import batches, take_samples, to_sample
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.records import log_skip, raw_records, read_shard
from mmalign.data.remote import Fault, take_faults
from mmalign.data.resume import resumed_records
from mmalign.data.samples import RecordSpec, Rejected, Sample, Tower
from mmalign.data.sources import ShardSource, resolve_sources
from mmalign.data.splitting import Split, current_split, plan_split
from mmalign.data.survey import ShardSurvey, missing_modalities
from mmalign.data.views import check_views, parse_group_field
from mmalign.dist import resolve_world
from mmalign.errors import UserError


class NoUsableData(UserError):
    """An epoch of a loader gave no batch: no record was usable (the message says why)."""


def _share(total: int | None, split: Split) -> int | None:
    """This worker's part of a per-rank sample budget."""
    if total is None:
        return None
    return total // split.num_workers + (split.worker < total % split.num_workers)


class ShardBatches(IterableDataset):
    """The batches of one rank for one epoch.

    :class:`Loader` sets ``epoch`` and ``world`` (rank and world size: the given ones, else
    torch.distributed's when it is initialized by then) before each epoch, and
    ``fast_forward`` (reader index -> raw records drawn, samples taken and records read per
    shard) to resume an epoch without decoding what was consumed.
    """

    def __init__(
        self,
        sources: list[ShardSource],
        spec: RecordSpec,
        batch_size: int,
        *,
        rank: int | None,
        world_size: int | None,
        resampled: bool,
        shuffle_buffer: int,
        seed: int,
        epoch_samples: int | None,
        drop_last: bool,
        require_modalities: bool = False,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_samples = epoch_samples
        self.drop_last = drop_last
        self.require_modalities = require_modalities
        self.epoch = 0
        self.world = resolve_world(rank, world_size)
        self.fast_forward: dict[int, tuple[int, int, list[list[int]] | None]] = {}
        self.source_of = {url: s.name for s in sources if s.named for url in s.urls}

    @property
    def urls(self) -> list[str]:
        """The shard URLs of every source."""
        return [url for source in self.sources for url in source.urls]

    def __iter__(self) -> Iterator[Delivery]:
        split = current_split(*self.world)
        self.spec.epoch = self.epoch  # data.views: sample picks per pass
        take_faults()  # faults of earlier reading in this process are not this epoch's
        survey = None
        if self.resampled:
            survey = ShardSurvey(self.urls, self.spec.fields if self.require_modalities else {})
        drawn, taken, counts = self.fast_forward.get(split.index, (0, 0, None))
        observed: list[list[int]] = [[] for _ in self.sources]
        records = self._records(split, survey, observed, drawn, counts)
        tally = Tally(drawn, taken)
        entries = _settled(records, self.spec, survey, self.source_of, tally)
        share = _share(self.epoch_samples, split)
        entries = take_samples(entries, None if share is None else share - taken)
        for batch, skipped in batches(entries, self.spec, self.batch_size, self.drop_last):
            shards = [list(counts) for counts in observed]
            yield Delivery(batch, skipped, None, split.index, tally.drawn, tally.samples, shards)
        if survey is not None and survey.verdict is not None:
            yield Delivery(Batch.empty(self.spec.modalities, {}), [], survey.verdict)

    def _records(
        self,
        split: Split,
        survey: ShardSurvey | None,
        observed: list[list[int]],
        drawn: int,
        counts: list[list[int]] | None,
    ) -> Iterator[dict[str, Any]]:
        """This split's raw records, after the first ``drawn`` when resuming: without
        opening the consumed shards when the mark counted them (:mod:`mmalign.data.resume`),
        else read and passed over."""
        shuffle = self.shuffle_buffer > 0
        plans = [
            plan_split(s.urls, split, shuffle=shuffle, seed=self.seed, epoch=self.epoch)
            for s in self.sources
        ]
        if drawn and counts is not None and all(plan.stride == 1 for plan in plans):
            return resumed_records(
                self.sources,
                [plan.urls for plan in plans],
                counts,
                drawn,
                buffer=self.shuffle_buffer,
                seed=self.seed,
                epoch=self.epoch,
                index=split.index,
                read_shard=functools.partial(read_shard, limits=self.spec.limits),
                observed=observed,
            )
        records = raw_records(
            self.sources,
            split,
            resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=self.epoch,
            limits=self.spec.limits,
            survey=survey,
            observed=observed,
        )
        return islice(records, drawn, None) if drawn else records


@dataclass
class Tally:
    """Raw records a reader drew and samples it took so far in an epoch."""

    drawn: int = 0
    samples: int = 0


@dataclass
class Delivery:
    """What a worker sends: a batch, the records skipped since the previous one, and why the
    stream stopped when it cannot give what is asked (``verdict``); the reader that sent it,
    its :class:`Tally` after the batch, and the shard faults since its previous delivery."""

    batch: Batch
    skipped: list[Rejected]
    verdict: str | None = None
    reader: int = 0
    drawn: int = 0
    samples: int = 0
    shards: list[list[int]] | None = None
    """Records read of each shard the reader started, per source (:mod:`~.resume`)."""
    faults: list[Fault] = field(default_factory=take_faults)


def _settled(
    records: Iterable[dict[str, Any]],
    spec: RecordSpec,
    survey: ShardSurvey | None,
    source_of: Mapping[str, str],
    tally: Tally,
) -> Iterator[Sample | Rejected]:
    """``to_sample`` of each record, tagged with its source, reported to ``survey`` (used
    or not) and counted in ``tally``."""
    for raw in records:
        entry = to_sample(raw, spec)
        tally.drawn += 1
        if isinstance(entry, Sample):
            tally.samples += 1
        if survey is not None:
            survey.settle(raw, list(entry.items) if isinstance(entry, Sample) else None)
        source = source_of.get(raw["__url__"], "")
        if source:
            entry = replace(entry, source=source)
        yield entry


def _keep(delivery: Any) -> Any:
    """The DataLoader's ``collate_fn`` with ``batch_size=None``: each delivery as it is."""
    return delivery


def _listed(urls: list[str], shown: int = 3) -> str:
    more = f", +{len(urls) - shown} more" if len(urls) > shown else ""
    return ", ".join(urls[:shown]) + more


class Loader:
    """Iterate for one epoch of batches; ``counters`` add up what every worker reported.

    Yields :class:`~mmalign.batch.Batch` objects (``labels`` set when a label field is).
    Each ``iter()`` is one epoch with its own shuffle seed; resampled streams without
    ``epoch_samples`` never end.

    Example:
        >>> for batch in loader:  # doctest: +SKIP
        ...     model(batch.inputs, present=batch.present)
        >>> loader.counters  # doctest: +SKIP
        {'seen': 5032, 'used': 5030, 'skipped/bad_image': 2}
    """

    def __init__(self, stream: ShardBatches, workers: int = 0, field: str = "shards") -> None:
        self.stream = stream
        self.workers = workers
        self.field = field
        self.epoch = 0
        self._counters: Counter[str] = Counter()
        self._first_skip: Rejected | None = None
        self.faults: Counter[str] = Counter()
        """Failed reads per shard URL so far (:mod:`mmalign.data.remote`)."""
        self._mark: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None

    @property
    def modalities(self) -> list[str]:
        return self.stream.spec.modalities

    @property
    def counters(self) -> dict[str, int]:
        """Records ``seen``, ``used``, ``skipped/<reason>`` and ``dropped/<reason>`` so far
        (and ``<source>/...`` of named sources, ``faults/<outcome>`` of shard reads)."""
        return {"seen": 0, "used": 0, **dict(sorted(self._counters.items()))}

    def state_dict(self) -> dict[str, Any]:
        """The next epoch and the counters (for checkpoints)."""
        return {"epoch": self.epoch, "counters": dict(self._counters)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._counters = Counter(state.get("counters", {}))

    def resume_mark(self) -> dict[str, Any] | None:
        """Where the next epoch-resume can start without decoding: the latest batch count
        of this epoch after which every reader had sent the same number of batches, with
        each reader's :class:`Tally` and the counters then (None: none yet, or resampled)."""
        return self._mark

    def fast_forward(self, mark: Mapping[str, Any]) -> bool:
        """Make the next ``iter()`` start after a :meth:`resume_mark` of the same epoch (its
        batches are not yielded: the readers pass over their records without decoding).
        False (and nothing changes) when the mark was made by other readers (another
        ``data.workers`` or rank) or the stream is resampled."""
        rank, _ = resolve_world(self.stream.rank, self.stream.world_size)
        readers = max(self.workers, 1)
        expected = {str(rank * readers + worker) for worker in range(readers)}
        if self.stream.resampled or set(mark.get("readers", {})) != expected:
            return False
        self._resume = dict(mark)
        return True

    def _source(self) -> Iterator[Delivery]:
        if self.workers == 0:
            return iter(self.stream)
        return iter(
            DataLoader(self.stream, batch_size=None, num_workers=self.workers, collate_fn=_keep)
        )

    def _start(self) -> _Progress:
        """Set up the stream for the next epoch; the progress it starts from."""
        self.stream.epoch = self.epoch
        self.stream.world = resolve_world(self.stream.rank, self.stream.world_size)
        self.epoch += 1
        progress = _Progress(max(self.workers, 1), len(self.modalities))
        self._mark, resume, self._resume = None, self._resume, None
        self.stream.fast_forward = {}
        if resume is not None:
            progress.restore(resume)
            self.stream.fast_forward = progress.tallies()
            self._counters = Counter(resume["counters"])
            self._mark = resume
        return progress

    def _take(self, delivery: Delivery) -> None:
        """Add up a delivery's counters, log its skipped records, count its faults."""
        batch = delivery.batch
        self._counters.update(batch.counters)
        batch.counters = {}
        for skip in delivery.skipped:
            log_skip(skip.url, skip.key, skip.counter.removeprefix("skipped/"), skip.message)
        self._first_skip = self._first_skip or next(iter(delivery.skipped), None)
        for fault in delivery.faults:
            self._counters[f"faults/{fault.outcome}"] += 1
            self.faults[fault.url] += 1

    def __iter__(self) -> Iterator[Batch]:
        progress = self._start()
        for delivery in self._source():
            self._take(delivery)
            if delivery.verdict is not None:
                raise self._no_batch(delivery.verdict)
            batch = delivery.batch
            if not batch.keys:
                progress.finished = True
                continue
            progress.add(delivery, batch)
            if not self.stream.resampled and progress.even():
                self._mark = progress.mark(self._counters)
            yield batch
        if progress.yielded == 0:
            raise self._no_batch()
        if self._whole_epoch_checked() and not all(progress.present):
            missing = [m for m, found in zip(self.modalities, progress.present) if not found]
            fields = self.stream.spec.fields
            raise self._no_batch(missing_modalities(len(self.stream.urls), missing, fields))

    def _whole_epoch_checked(self) -> bool:
        """Whether this finished epoch read every record and modalities are required."""
        stream = self.stream
        whole = not stream.resampled and stream.epoch_samples is None
        return stream.require_modalities and whole and stream.world[1] == 1

    def _no_batch(self, verdict: str | None = None) -> NoUsableData:
        stream, counters = self.stream, self.counters
        shown = ", ".join(f"{key} {value}" for key, value in counters.items())
        if verdict is not None:
            hint = "check the shards and data.fields"
        elif counters["used"]:
            hint = (
                f"{counters['used']} usable records are fewer than data.batch_size "
                f"{stream.batch_size} (the last partial batch is dropped)"
            )
        elif counters.get("dropped/no_modality"):
            fields = ", ".join(f"{m}: {';'.join(e)}" for m, e in stream.spec.fields.items())
            hint = f"no record has a file with the extensions of data.fields ({fields})"
        else:
            hint = "check the shards and data.fields"
        first = self._first_skip
        example = (
            f"; first skipped: {first.key!r} in {first.url} ({first.message})" if first else ""
        )
        what = f"cannot train on {self.field}: {verdict}" if verdict else "no batch"
        # the counts first: a long list of shards is what a cut line loses
        return NoUsableData(f"{what} (records {shown}; {_listed(stream.urls)}){example}; {hint}")


class _Progress:
    """What one epoch of a :class:`Loader` has yielded: batches in all and per reader, each
    reader's latest :class:`Tally`, the modalities present so far."""

    def __init__(self, readers: int, modalities: int) -> None:
        self.readers = readers
        self.yielded = 0
        self.sent: Counter[int] = Counter()
        self.latest: dict[int, tuple[int, int, list[list[int]] | None]] = {}
        self.present = [False] * modalities
        self.finished = False

    def add(self, delivery: Delivery, batch: Batch) -> None:
        self.yielded += 1
        self.sent[delivery.reader] += 1
        self.latest[delivery.reader] = (delivery.drawn, delivery.samples, delivery.shards)
        self.present = [a or b for a, b in zip(self.present, batch.present.any(0).tolist())]

    def even(self) -> bool:
        """Whether every reader sent the same number of batches and none has finished (the
        DataLoader's round robin starts again at the first reader)."""
        counts = set(self.sent.values())
        return not self.finished and len(self.sent) == self.readers and len(counts) == 1

    def mark(self, counters: Mapping[str, int]) -> dict[str, Any]:
        return {
            "batches": self.yielded,
            "readers": {str(r): list(t) for r, t in sorted(self.latest.items())},
            "counters": dict(counters),
            "present": list(self.present),
        }

    def restore(self, mark: Mapping[str, Any]) -> None:
        self.yielded = int(mark["batches"])
        self.latest = {
            int(r): (int(t[0]), int(t[1]), t[2] if len(t) > 2 else None)
            for r, t in mark["readers"].items()
        }
        self.sent = Counter(dict.fromkeys(self.latest, self.yielded // self.readers))
        self.present = [bool(p) for p in mark["present"]]

    def tallies(self) -> dict[int, tuple[int, int, list[list[int]] | None]]:
        return dict(self.latest)


def check_negatives(modality: str | None, towers: Mapping[str, Tower]) -> str | None:
    """``data.negatives`` must name a tower."""
    if modality is not None and modality not in towers:
        raise ConfigError(f"data.negatives: no tower named {modality!r}; use one of {list(towers)}")
    return modality


def _check_fields(towers: Mapping[str, Tower], fields: Mapping[str, str]) -> None:
    if not list(towers):
        raise ValueError("make_loader needs at least one tower")
    for modality in towers:
        if modality not in fields:
            raise ConfigError(
                f"no file extension configured for modality {modality!r}: set "
                f"data.fields.{modality} (e.g. 'png', 'txt', 'flac', 'graph.json', 'npy')"
            )


def make_loader(
    shards: str | Sequence[str] | Sequence[DataSource],
    towers: Mapping[str, Tower],
    fields: Mapping[str, str],
    batch_size: int,
    *,
    workers: int = 0,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    seed: int = 0,
    epoch_samples: int | None = None,
    label_field: str | None = None,
    metadata_fields: Sequence[str] = (),
    group_field: str | None = None,
    views: Mapping[str, str] | None = None,
    negatives: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    augment: bool = False,
    field: str = "shards",
    limits: RecordLimits = DEFAULT_LIMITS,
    require_modalities: bool = False,
    two_view: Sequence[str] = (),
) -> Loader:
    """A :class:`Loader` over WebDataset shards for the given towers.

    ``fields`` maps each tower's modality to its file extension(s) (``"jpg;png"``);
    ``epoch_samples`` caps an epoch per rank (and bounds resampled streams);
    ``field`` names the shard setting in error messages (``data.train``); ``limits`` are the
    per-record limits (default: those of a default ``DataConfig``); ``require_modalities``
    raises :class:`NoUsableData` when no usable record has some modality (see the module
    docstring); ``group_field`` and ``views`` are described in :mod:`mmalign.data.views`,
    ``negatives`` in :mod:`mmalign.data.negatives`; ``two_view`` (modalities) in
    :mod:`mmalign.data.two_views`.

    Example:
        >>> loader = make_loader("shards/", {"text": text_tower}, {"text": "txt"}, 32,
        ...     label_field="cls", metadata_fields=["json"])  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_fields(towers, fields)
    towers = {**towers, **{second_view(modality): towers[modality] for modality in two_view}}
    spec = RecordSpec(
        towers=towers,
        fields={
            modality: parse_alternatives(fields[base_modality(modality)]) for modality in towers
        },
        label=parse_alternatives(label_field) if label_field else None,
        metadata={name: parse_alternatives(name) for name in metadata_fields},
        augment=augment,
        limits=limits,
        group=parse_group_field(group_field) if group_field else None,
        views=check_views(views or {}, list(towers)),
        negatives=check_negatives(negatives, towers),
        seed=seed,
        two_view=tuple(two_view),
    )
    stream = ShardBatches(
        resolve_sources(shards, field),
        spec,
        batch_size,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch_samples=epoch_samples,
        drop_last=drop_last,
        require_modalities=require_modalities,
    )
    return Loader(stream, workers, field)


def loader_from_config(
    data_cfg: DataConfig,
    towers: Mapping[str, Tower],
    split: str = "train",
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
    label_field: str | EllipsisType | None = ...,
    two_view: Sequence[str] = (),
) -> Loader:
    """The loader of one split of a :class:`~mmalign.config.DataConfig`: the one mapping of
    the data settings to a loader (training, validation, evaluation).

    ``train`` shuffles (``data.shuffle_buffer``), resamples (if ``data.resampled``), caps
    epochs at ``data.epoch_samples``, augments, drops the last partial batch and
    requires every modality in some usable record (``require_modalities``); ``val`` and
    ``test`` read every record once, in order, without augmentation, and drop the last
    partial batch only with several processes (so every rank has the same number of full
    batches). ``rank`` / ``world_size`` default to torch.distributed's, ``seed`` to
    ``data.seed`` and ``label_field`` to ``data.label_field`` (``None``: no labels);
    ``two_view``: modalities given a second view in training (``model.objective.terms``).

    Example:
        >>> loader = loader_from_config(cfg.data, model.towers, "val")  # doctest: +SKIP
        >>> loader = loader_from_config(cfg.data, model.towers, "train", seed=7,
        ...     label_field=None, rank=0, world_size=2)  # doctest: +SKIP
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    shards = getattr(data_cfg, split)
    if shards is None:
        raise ConfigError(f"data.{split} is not set; give it a shard pattern, directory or list")
    training = split == "train"
    _, processes = resolve_world(rank, world_size)
    return make_loader(
        shards,
        towers,
        data_cfg.fields,
        data_cfg.batch_size,
        workers=data_cfg.workers,
        shuffle_buffer=data_cfg.shuffle_buffer if training else 0,
        resampled=data_cfg.resampled and training,
        seed=data_cfg.seed if seed is None else seed,
        epoch_samples=data_cfg.epoch_samples if training else None,
        label_field=data_cfg.label_field if label_field is ... else label_field,
        group_field=data_cfg.group_field,
        views=data_cfg.views if training else dict.fromkeys(data_cfg.views, "first"),
        negatives=data_cfg.negatives if training else None,
        rank=rank,
        world_size=world_size,
        drop_last=training or processes > 1,
        augment=training,
        field=f"data.{split}",
        limits=RecordLimits.from_config(data_cfg),
        require_modalities=training,
        two_view=two_view if training else (),
    )
