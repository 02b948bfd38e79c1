"""Loading a saved model and embedding WebDataset shards with it, for evaluation and export.

A *model directory* holds ``model.safetensors`` (``save_pretrained``); a *run directory*
holds ``model/`` (the final model of ``mmalign train``) and ``config.yaml`` (whose
``data.fields`` map modalities to record extensions).

Example:
    >>> model = load_model("runs/digits")  # doctest: +SKIP
    >>> stream = EmbeddingStream(model, "data/digits/val-000000.tar", ["image"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mmalign.batch import Batch
from mmalign.config.strict_yaml import read_yaml
from mmalign.errors import ConfigError
from mmalign.progress import progress_bar

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

DEFAULT_EXTENSIONS = {
    "image": "png;jpg;jpeg;webp",
    "text": "txt",
    "audio": "flac;wav",
    "graph": "graph.json;npz",
    "tabular": "npy",
}
"""Record extensions per tower type when neither the caller nor a run config names them."""


def model_directory(path: str | Path, where: str | None = None) -> Path:
    """The directory holding ``model.safetensors``: ``path`` itself or ``path/model``; a
    ``FileNotFoundError`` naming ``where`` (the flag that gave ``path``; default: ``path``)
    otherwise.

    Example:
        >>> model_directory("/", "--model")
        Traceback (most recent call last):
        ...
        FileNotFoundError: / holds neither model.safetensors nor model/model.safetensors: it is \
no model directory and no run directory (--model); pass the output of save_pretrained or of \
mmalign train
    """
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds neither model.safetensors nor model/model.safetensors: it is no model "
        f"directory and no run directory ({where or path}); pass the output of save_pretrained "
        "or of mmalign train"
    )


def check_modalities(
    model: AlignmentModel, names: Sequence[str], where: str = "--modalities"
) -> None:
    """Raise a :class:`~mmalign.errors.ConfigError` naming ``where`` (the flag or argument
    that gave ``names``) and listing the model's modalities when one of ``names`` is not one,
    or when one is named twice.

    Example:
        >>> from types import SimpleNamespace
        >>> check_modalities(SimpleNamespace(modalities=["image", "text"]), ["imgae"], "--query")
        Traceback (most recent call last):
        ...
        mmalign.errors.ConfigError: unknown modality 'imgae' (--query); use one of ...
        >>> check_modalities(SimpleNamespace(modalities=["image"]), ["image", "image"])
        Traceback (most recent call last):
        ...
        mmalign.errors.ConfigError: modality 'image' is named twice (--modalities); name each once
    """
    unknown = [name for name in names if name not in model.modalities]
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        raise ConfigError(
            f"unknown modality {listed} ({where}); use one of the model's modalities: "
            f"{', '.join(model.modalities)}"
        )
    repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if repeated is not None:
        raise ConfigError(f"modality {repeated!r} is named twice ({where}); name each once")


def load_model(model_or_dir: AlignmentModel | str | Path) -> AlignmentModel:
    """An :class:`~mmalign.AlignmentModel` as given, or loaded from a model or run directory."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir
    from mmalign.model import AlignmentModel

    return AlignmentModel.from_pretrained(model_directory(model_or_dir))


def run_fields(source: str | Path | None) -> dict[str, str]:
    """``data.fields`` of the run a model comes from: ``config.yaml`` in a run directory, or
    beside a run's ``model/`` directory; empty when there is none."""
    if source is None:
        return {}
    source = Path(source)
    candidates = [source / "config.yaml"]
    if source.name == "model":
        candidates.append(source.parent / "config.yaml")
    for candidate in candidates:
        if candidate.is_file():
            data = read_yaml(candidate, "the run's config") or {}
            if not isinstance(data, dict):
                raise ConfigError(
                    f"the run's config is no mapping ({candidate}); restore the run's "
                    "config.yaml or pass the fields with --field MODALITY=EXT"
                )
            return dict((data.get("data") or {}).get("fields") or {})
    return {}


def resolve_fields(
    model: AlignmentModel,
    modalities: Sequence[str],
    fields: Mapping[str, str] | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, str]:
    """Record extensions of ``modalities``: ``fields``, else the run's ``data.fields`` (see
    :func:`run_fields`), else the default extensions of each tower type."""
    known = {**run_fields(run_dir), **(fields or {})}
    resolved = {}
    for name in modalities:
        if name not in model.modalities:
            raise ValueError(f"modality {name!r} is not one of the model's {model.modalities}")
        tower_type = model.config.towers[name].type
        resolved[name] = known.get(name) or DEFAULT_EXTENSIONS.get(tower_type, tower_type)
    return resolved


@dataclass
class EmbeddedBatch:
    """Embeddings of consecutive samples: row i of every field belongs to ``keys[i]``.

    ``embeddings[m]`` is ``[B, dim]`` float32 on the CPU; rows of samples without ``m`` are
    zeros and ``present[m]`` is False there.
    """

    keys: list[str]
    embeddings: dict[str, Tensor]
    present: dict[str, Tensor]
    labels: Tensor | None = None
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, rows: slice) -> EmbeddedBatch:
        return EmbeddedBatch(
            keys=self.keys[rows],
            embeddings={name: value[rows] for name, value in self.embeddings.items()},
            present={name: value[rows] for name, value in self.present.items()},
            labels=self.labels[rows] if self.labels is not None else None,
            metadata={name: values[rows] for name, values in self.metadata.items()},
        )

    @classmethod
    def concatenate(cls, parts: Sequence[EmbeddedBatch]) -> EmbeddedBatch:
        """The rows of ``parts`` one after the other."""
        first = parts[0]
        labels = [part.labels for part in parts if part.labels is not None]
        return cls(
            keys=[key for part in parts for key in part.keys],
            embeddings={m: torch.cat([p.embeddings[m] for p in parts]) for m in first.embeddings},
            present={m: torch.cat([p.present[m] for p in parts]) for m in first.present},
            labels=torch.cat(labels) if len(labels) == len(parts) else None,
            metadata={f: [v for p in parts for v in p.metadata[f]] for f in first.metadata},
        )


@torch.no_grad()
def embed_batch(model: AlignmentModel, batch: Batch, modalities: Sequence[str]) -> EmbeddedBatch:
    """Embeddings of one loader :class:`~mmalign.batch.Batch` for ``modalities``."""
    outputs = model(batch.to(model.device))
    return EmbeddedBatch(
        keys=list(batch.keys),
        embeddings={name: outputs[name].detach().float().cpu() for name in modalities},
        present={name: batch.present_of(name).cpu() for name in modalities},
        labels=batch.labels.cpu() if batch.labels is not None else None,
        metadata=dict(batch.metadata),
    )


def make_eval_loader(
    model: AlignmentModel,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    *,
    fields: Mapping[str, str] | None = None,
    run_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    label_field: str | None = None,
    metadata_fields: Sequence[str] = (),
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    """A deterministic loader (sequential, unshuffled, not resampled) over ``shards``."""
    from mmalign.data import make_loader

    check_modalities(model, modalities)
    towers = {name: model.towers[name] for name in modalities}
    return make_loader(
        shards,
        towers,
        resolve_fields(model, modalities, fields, run_dir),
        batch_size,
        workers=workers,
        shuffle_buffer=0,
        resampled=False,
        label_field=label_field,
        metadata_fields=tuple(metadata_fields),
        rank=rank,
        world_size=world_size,
        drop_last=False,
        augment=False,
    )


class EmbeddingStream:
    """Embed the records of ``shards`` in order, one :class:`EmbeddedBatch` per loader batch.

    The first ``skip_rows`` records are read but not embedded (resuming an export);
    ``counters`` are the loader's (``seen``, ``used``, ``skipped/<reason>``, ...).
    ``loader_options`` are those of :func:`make_eval_loader`.
    """

    def __init__(
        self,
        model: AlignmentModel,
        shards: str | Sequence[str],
        modalities: Sequence[str],
        *,
        skip_rows: int = 0,
        **loader_options: Any,
    ) -> None:
        self.model = model
        self.modalities = list(modalities)
        self.skip_rows = skip_rows
        self.loader = make_eval_loader(model, shards, modalities, **loader_options)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.loader.counters)

    def __iter__(self) -> Iterator[EmbeddedBatch]:
        self.model.eval()
        position = 0
        for batch in self.loader:
            size = len(batch)
            start, position = position, position + size
            if position <= self.skip_rows:
                continue
            embedded = embed_batch(self.model, batch, self.modalities)
            yield embedded[max(0, self.skip_rows - start) :]


@dataclass
class CollectedEmbeddings:
    """Embeddings of a whole evaluation set (see :class:`EmbeddedBatch` for the fields)."""

    keys: list[str]
    embeddings: dict[str, Tensor]
    present: dict[str, Tensor]
    labels: Tensor


def collect_embeddings(
    model: AlignmentModel,
    shards: str | Sequence[str],
    modalities: Sequence[str],
    *,
    max_samples: int | None = None,
    **loader_options: Any,
) -> CollectedEmbeddings:
    """All embeddings of ``shards`` (the first ``max_samples`` records) in memory.

    ``labels`` are -1 where a record has no label (or no ``label_field`` was given).
    """
    keys: list[str] = []
    parts: dict[str, list[Tensor]] = {name: [] for name in modalities}
    masks: dict[str, list[Tensor]] = {name: [] for name in modalities}
    labels: list[Tensor] = []
    bar = progress_bar(desc=f"embed {', '.join(modalities)}", unit="sample", total=max_samples)
    for batch in EmbeddingStream(model, shards, modalities, **loader_options):
        take = len(batch) if max_samples is None else min(len(batch), max_samples - len(keys))
        bar.update(take)
        keys.extend(batch.keys[:take])
        for name in modalities:
            parts[name].append(batch.embeddings[name][:take])
            masks[name].append(batch.present[name][:take])
        batch_labels = batch.labels if batch.labels is not None else torch.full((len(batch),), -1)
        labels.append(batch_labels[:take].long())
        if max_samples is not None and len(keys) >= max_samples:
            break
    bar.close()
    if not keys:
        raise ValueError(f"no record with any of {list(modalities)} was read from {shards}")
    return CollectedEmbeddings(
        keys=keys,
        embeddings={name: torch.cat(parts[name]) for name in modalities},
        present={name: torch.cat(masks[name]) for name in modalities},
        labels=torch.cat(labels),
    )
