"""How manifest columns become record files: extensions inferred from the values when
``--fields`` is absent, and numeric columns packed into one vector (``--vector``).

Inference looks at every non-empty cell of a column:

=====================================================  ====================================
cells                                                  extension
=====================================================  ====================================
at least half name a file by its suffix (``.jpg``,     that suffix (the most common one); the
``.wav``, ``.mp4``, ``.graph.json``, ``.npy``,         column is a *file column*: a missing
``.csv``, ``.txt``, ...)                               or unreadable file skips the row
most are integers                                      ``cls`` (the others: bad rows)
all lists of numbers (JSONL) or ``[...]`` text         ``npy``
all objects (JSONL) or ``{...}`` text                  ``graph.json`` with ``edge_index``,
                                                       else ``json``
anything else                                          ``txt``
=====================================================  ====================================

Example:
    >>> rows = [{"key": "a", "image": "a.jpg", "caption": "a dog", "label": "3"},
    ...         {"key": "b", "image": "b.png", "caption": "a cat", "label": "5"},
    ...         {"key": "c", "image": "c.jpg", "caption": "a cow", "label": ""}]
    >>> infer_fields(rows, key_column="key")
    ({'image': 'jpg', 'caption': 'txt', 'label': 'cls'}, {'image'})
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

from webdataset.autodecode import IMAGE_EXTENSIONS

from mmalign.data.decode import AUDIO_EXTENSIONS
from mmalign.data.video import VIDEO_EXTENSIONS

FILE_EXTENSIONS = frozenset(
    {*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS, *VIDEO_EXTENSIONS}
    | {"npz", "npy", "csv", "graph.json", "json", "txt"}
)
"""Suffixes that make a cell name a file (``.graph.json`` counts as one suffix)."""
INTEGER = re.compile(r"-?\d+")


def file_suffix(value: Any) -> str | None:
    """The known file suffix a cell ends in (``"img/a.JPG"`` -> ``"jpg"``), else None.

    Example:
        >>> file_suffix("graphs/g1.graph.json"), file_suffix("a dog."), file_suffix(3)
        ('graph.json', None, None)
    """
    if not isinstance(value, str) or "\n" in value or len(value) > 4096:
        return None
    name = PurePath(value.strip()).name.lower()
    if name.endswith(".graph.json"):
        return "graph.json"
    suffix = name.rpartition(".")[2] if "." in name else ""
    return suffix if suffix in FILE_EXTENSIONS else None


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(INTEGER.fullmatch(value)))


def _json_kind(value: Any) -> str | None:
    """``"list"`` / ``"object"`` for a list / dict (or its JSON text), else None."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "graph" if "edge_index" in value else "object"
    return None


def infer_extension(values: Sequence[Any]) -> tuple[str, bool]:
    """``(extension, is_file_column)`` of a column's non-empty cells (see the module table).

    Example:
        >>> infer_extension(["clips/a.wav", "clips/b.wav", "clips/missing"])
        ('wav', True)
        >>> infer_extension(["[1, 2]", "[3, null]"])
        ('npy', False)
    """
    suffixes = Counter(suffix for suffix in map(file_suffix, values) if suffix is not None)
    if values and 2 * sum(suffixes.values()) >= len(values):
        return suffixes.most_common(1)[0][0], True
    if values and 2 * sum(map(_is_integer, values)) > len(values):
        return "cls", False
    kinds = {_json_kind(value) for value in values}
    if kinds == {"list"}:
        return "npy", False
    if kinds == {"graph"}:
        return "graph.json", False
    if kinds and kinds <= {"graph", "object"}:
        return "json", False
    return "txt", False


def infer_fields(
    rows: Sequence[Mapping[str, Any]], key_column: str, skip: Iterable[str] = ()
) -> tuple[dict[str, str], set[str]]:
    """``(column -> extension, file columns)`` for every column but the key and ``skip``."""
    ignored = {key_column, *skip}
    columns = list(dict.fromkeys(c for row in rows for c in row if c not in ignored))
    fields, file_columns = {}, set()
    for column in columns:
        values = [row[column] for row in rows if row.get(column) not in (None, "")]
        extension, is_file = infer_extension(values)
        fields[column] = extension
        if is_file:
            file_columns.add(column)
    return fields, file_columns


def pack_vector(row: Mapping[str, Any], columns: Sequence[str]) -> list[float] | None:
    """The numbers of ``columns`` in one row, NaN for empty cells; None when all are empty.

    Raises ``ValueError`` naming the column of a cell that is not a number.

    Example:
        >>> pack_vector({"age": "41", "bp": "", "hr": 70}, ["age", "bp", "hr"])
        [41.0, nan, 70.0]
    """
    vector = []
    for column in columns:
        value = row.get(column)
        if value is None or value == "":
            vector.append(math.nan)
            continue
        try:
            vector.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"column {column!r}: {str(value)[:40]!r} is not a number") from None
    return None if all(math.isnan(v) for v in vector) else vector
