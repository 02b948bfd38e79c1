"""Searching an index: encode one raw query sample with the model, return the nearest rows.

The query is an already parsed sample (a string for text, a path or image for images, a list
of numbers for tabular towers...) of a real modality of the model; turning command-line
strings into samples is the command line's job (``mmalign search``).

Example:
    >>> rows = search("emb", None, "the digit seven", "text", k=3, target="image")  # doctest: +SKIP
    >>> rows[0]["key"]  # doctest: +SKIP
    'test-000123'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmalign.eval.loading import load_model
from mmalign.export.index import load_index
from mmalign.export.reading import read_manifest


def recorded_model(index_dir: str | Path) -> str:
    """The model or run directory an export recorded (to encode queries against it).

    Example:
        >>> recorded_model("emb")  # doctest: +SKIP
        'runs/digits/model'
    """
    model = read_manifest(index_dir)["settings"].get("model_path")
    if model is None:
        raise ValueError(
            f"{index_dir} was exported from an in-memory model; pass the model to search "
            "(--model on the command line)"
        )
    return model


def search(
    index_dir: str | Path,
    model: Any,
    query: Any,
    modality: str,
    k: int = 10,
    *,
    target: str | None = None,
) -> list[dict[str, Any]]:
    """Encode one raw ``query`` of ``modality`` (a modality name of the model, not a tower
    type) and return the ``k`` nearest indexed rows.

    ``target`` is the indexed modality (default: the only one built in ``index_dir``);
    ``model`` is a model, a model/run directory, or ``None`` for the model the export
    recorded. Each row: ``rank``, ``score`` (inner product), ``key``, ``present_*`` and the
    exported metadata fields.

    Example:
        >>> search("emb", None, "a handwritten seven", "text", k=3)  # doctest: +SKIP
        [{'rank': 1, 'score': 0.83, 'key': 'test-000017', ...}, ...]
    """
    loaded = load_index(index_dir, target)
    model = load_model(recorded_model(index_dir) if model is None else model)
    if modality not in model.modalities:
        raise ValueError(
            f"the model has no modality {modality!r}; modalities: {list(model.modalities)}"
        )
    vector = model.encode(modality, [query], batch_size=1)
    return loaded.search(vector, k)[0]
