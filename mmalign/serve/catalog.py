"""What ``mmalign serve`` loads once at start: the model and, per export, its indexes, its
metadata and its kept items (:mod:`mmalign.export.items`).

An export is served under a name (its directory's name, or ``NAME=DIR``); each of its built
indexes answers at its own dim and, for a Matryoshka model, at every trained prefix below it
(an exact in-memory index over the truncated embeddings, built on first use:
:func:`~mmalign.export.index.prefix_index`).

Example:
    >>> catalog = load_catalog(["emb"], "runs/digits")  # doctest: +SKIP
    >>> catalog.export("emb").index("image", None).info["dim"]  # doctest: +SKIP
    64
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mmalign.data.exports import ExportError, load_metadata, read_manifest
from mmalign.eval.loading import load_model
from mmalign.export.index import EmbeddingIndex, indexed_modalities, load_index, prefix_index
from mmalign.export.items import kept_modalities, load_items
from mmalign.export.search import check_export_model
from mmalign.serve.problems import RequestError

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel


@dataclass
class ServedExport:
    """One export as served: its indexes by modality, the metadata of every row (the ids of
    clip-retrieval's API are row numbers of this table) and the kept items."""

    name: str
    directory: Path
    model: AlignmentModel
    indexes: dict[str, EmbeddingIndex]
    metadata: pa.Table
    items: dict[str, dict[str, tuple[str, bytes]]]
    row_of_key: dict[str, int] = field(default_factory=dict)
    _prefixes: dict[tuple[str, int], EmbeddingIndex] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def target(self, name: str | None) -> str:
        """The indexed modality a request names (a modality or a tower type; default: the
        only index), or a :class:`RequestError` naming ``target``."""
        built = list(self.indexes)
        if name is None:
            if len(built) == 1:
                return built[0]
            raise RequestError("target", f"{self.name} has indexes for {built}", "name one")
        if name in self.indexes:
            return name
        of_type = [m for m in built if self.model.config.towers[m].type == name]
        if of_type:
            return of_type[0]
        raise RequestError(
            "target", f"{self.name} has no index for {name!r}", f"use one of {built}"
        )

    def dims(self, target: str) -> list[int]:
        """The dims ``target`` is served at: the index's, and the trained prefixes below it."""
        width = int(self.indexes[target].info["dim"])
        prefixes = self.model.config.matryoshka or []
        return sorted({width, *(int(p) for p in prefixes if p < width)})

    def index(self, target: str, dim: int | None) -> EmbeddingIndex:
        """The index of ``target`` at ``dim`` (``None``: the index's own), or a
        :class:`RequestError` naming ``dim`` for a dim that was not trained."""
        index = self.indexes[target]
        if dim is None or dim == index.info["dim"]:
            return index
        if dim not in self.dims(target):
            raise RequestError(
                "dim",
                f"dim {dim} is not served for {self.name}/{target} (not a trained prefix)",
                f"use one of {self.dims(target)}",
            )
        with self._lock:
            if (target, dim) not in self._prefixes:
                self._prefixes[(target, dim)] = prefix_index(self.directory, target, dim)
        return self._prefixes[(target, dim)]

    def item(self, modality: str, key: str) -> tuple[str, bytes]:
        """The kept ``(extension, bytes)`` of one row's item, or a 404 naming the part of
        the path that matches nothing (never a file path: only kept keys exist)."""
        if modality not in self.items:
            raise RequestError("modality", f"{self.name} kept no {modality!r} items", "", 404)
        found = self.items[modality].get(key)
        if found is None:
            raise RequestError("key", f"{self.name} has no {modality} item {key!r}", "", 404)
        return found

    def row(self, row_id: Any) -> dict[str, Any]:
        """The metadata of one row by its number (clip-retrieval's ``id``)."""
        if not isinstance(row_id, int) or isinstance(row_id, bool):
            raise RequestError("ids", f"an id must be an integer, got {row_id!r}")
        if not 0 <= row_id < self.metadata.num_rows:
            raise RequestError("ids", f"id {row_id} is outside 0..{self.metadata.num_rows - 1}")
        return self.metadata.slice(row_id, 1).to_pylist()[0]


@dataclass
class Catalog:
    """The served model and exports, by name."""

    model: AlignmentModel
    exports: dict[str, ServedExport]

    def export(self, name: str | None, field_name: str = "index") -> ServedExport:
        """The export a request names (default: the first), or a 404 naming the field."""
        if name is None:
            return next(iter(self.exports.values()))
        if name not in self.exports:
            raise RequestError(
                field_name, f"no index named {name!r}", f"use one of {list(self.exports)}", 404
            )
        return self.exports[name]


def _named(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after its last part)."""
    name, sep, directory = spec.partition("=")
    return (name, Path(directory)) if sep else (Path(spec).name, Path(spec))


def load_export(name: str, directory: Path, model: AlignmentModel) -> ServedExport:
    """One export with its indexes, metadata and items (an :class:`ExportError` when it has
    no index)."""
    read_manifest(directory)
    built = indexed_modalities(directory)
    if not built:
        raise ExportError(
            f"{directory} has no index (EXPORT); build one with mmalign export --index flat"
        )
    metadata = load_metadata(directory)
    return ServedExport(
        name=name,
        directory=directory,
        model=model,
        indexes={modality: load_index(directory, modality) for modality in built},
        metadata=metadata,
        items={
            modality: load_items(directory, modality) for modality in kept_modalities(directory)
        },
        row_of_key={key: row for row, key in enumerate(metadata.column("key").to_pylist())},
    )


def load_catalog(exports: Sequence[str], model: AlignmentModel | str | Path | None) -> Catalog:
    """Load ``model`` (``None``: the one the first export recorded) and every export
    (``DIR`` or ``NAME=DIR``); two exports of one name, or an export that ``model`` did not
    make (its recorded weights fingerprint), are refused.

    Example:
        >>> list(load_catalog(["full=emb", "small=emb16"], None).exports)  # doctest: +SKIP
        ['full', 'small']
    """
    named = [_named(spec) for spec in exports]
    names = [name for name, _ in named]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ExportError(f"two exports are named {twice} (EXPORT); serve them as NAME=DIR")
    if model is None:
        model = read_manifest(named[0][1])["settings"].get("model_path")
        if model is None:
            raise ExportError(f"{named[0][1]} was exported from an in-memory model; pass --model")
    loaded = load_model(model)
    for _, path in named:  # another model's queries would not compare with the export's rows
        check_export_model(path, loaded)
    return Catalog(loaded, {name: load_export(name, path, loaded) for name, path in named})
