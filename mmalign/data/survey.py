"""Ends a resampled stream that cannot give what the config asks for, instead of spinning.

A resampled stream draws shards with replacement without end. When no record of any shard is
usable (an unreadable shard, every record failing to decode) it would read forever without
filling a batch; when no usable record has a modality (a ``data.fields`` typo, ``labs: npz``
for ``.npy`` files, or every file of it bad) it would train that modality on nothing. A
:class:`ShardSurvey` follows each shard *draw* through the pipeline (shuffle buffer
included): a draw is settled once the shard was read to its end and each of its records
was decoded and preprocessed. It gives a :attr:`~ShardSurvey.verdict`, and stops drawing, when

- every shard's latest settled draw gave no usable record, or
- every shard has been read through and some modality of ``fields`` was in no usable record.

Both rules are exact for what one reader sees (a shard with a usable record never counts as
barren; a modality used once is never missing) and bounded: with ``n`` shards, about
``n * ln(n)`` draws, each shard drawn once; a few draws for one shard.

Example:
    >>> survey = ShardSurvey(["a.tar"], {"labs": ("npz",)})
    >>> shard = lambda url: iter([{"__key__": "k", "npy": b"..."}])
    >>> for raw in survey.read(iter([{"url": "a.tar"}] * 3), shard):
    ...     survey.settle(raw, used=None)
    >>> survey.verdict
    'no record of the 1 shard is usable (each read through)'
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DRAW_KEY = "__draw__"
"""The raw-record key that names the shard draw a record came from."""
_SHOWN_EXTENSIONS = 12


@dataclass
class _Draw:
    url: str
    pending: int = 0
    finished: bool = False
    usable: bool = False


class ShardSurvey:
    """What the shards of a resampled stream hold so far (see the module docstring)."""

    def __init__(self, urls: Iterable[str], fields: Mapping[str, tuple[str, ...]]) -> None:
        self.urls = set(urls)
        self.fields = dict(fields)
        self.barren: set[str] = set()
        self.read_through: set[str] = set()
        self.found: set[str] = set()
        self.extensions: set[str] = set()
        self._draws: dict[int, _Draw] = {}
        self._next_draw = 0

    @property
    def verdict(self) -> str | None:
        """Why the stream cannot give what is asked, or None while it can."""
        if self.barren >= self.urls:
            return f"no record of the {_shards(len(self.urls))} is usable (each read through)"
        missing = [name for name in self.fields if name not in self.found]
        if self.read_through >= self.urls and missing:
            return missing_modalities(len(self.urls), missing, self.fields, self.extensions)
        return None

    def read(
        self,
        sources: Iterator[Mapping[str, str]],
        read_shard: Callable[[str], Iterator[dict[str, Any]]],
    ) -> Iterator[dict[str, Any]]:
        """Raw records of ``sources`` (``{"url": ...}``), each tagged with its draw; stops
        drawing once there is a :attr:`verdict`."""
        for source in sources:
            if self.verdict is not None:
                return
            draw, self._next_draw = self._next_draw, self._next_draw + 1
            state = self._draws[draw] = _Draw(source["url"])
            for raw in read_shard(source["url"]):
                state.pending += 1
                raw[DRAW_KEY] = draw
                yield raw
            state.finished = True
            self._settle(draw)

    def settle(self, raw: Mapping[str, Any], used: Collection[str] | None) -> None:
        """Record that ``raw`` (a record :meth:`read` gave) was used with the modalities
        ``used``, or not used (``None``)."""
        if len(self.extensions) < _SHOWN_EXTENSIONS:
            self.extensions |= {name for name in raw if not name.startswith("__")}
        self.found |= set(used or ())
        draw = raw[DRAW_KEY]
        state = self._draws[draw]
        state.pending -= 1
        state.usable |= used is not None
        self._settle(draw)

    def _settle(self, draw: int) -> None:
        state = self._draws[draw]
        if state.finished and state.pending == 0:
            del self._draws[draw]
            self.read_through.add(state.url)
            if state.usable:
                self.barren.discard(state.url)
            else:
                self.barren.add(state.url)


def missing_modalities(
    shards: int,
    missing: Iterable[str],
    fields: Mapping[str, tuple[str, ...]],
    extensions: Iterable[str] = (),
) -> str:
    """Why a stream cannot train ``missing`` modalities (for :class:`NoUsableData`).

    Example:
        >>> missing_modalities(3, ["labs"], {"labs": ("npz",)})
        'no usable record of the 3 shards has data.fields.labs: npz'
    """
    wanted = ", ".join(f"data.fields.{m}: {';'.join(fields[m])}" for m in missing)
    seen = sorted(extensions)[:_SHOWN_EXTENSIONS]
    shown = f" (extensions in the records: {', '.join(seen)})" if seen else ""
    return f"no usable record of the {_shards(shards)} has {wanted}{shown}"


def _shards(count: int) -> str:
    return "1 shard" if count == 1 else f"{count} shards"
