"""Mined hard negatives as extra rows (``data.negatives``).

``mmalign prep mine-negatives`` writes records carrying ``neg0.<ext>``, ``neg1.<ext>`` ... of
one modality. With ``data.negatives: <modality>`` the training loader turns each into an extra
row right after its record: only that modality present, no label, a group of its own. Such a
row is never a query (it lacks the other modalities); with ``model.objective.hard_negatives:
true`` the pairwise objectives take it as a candidate in the ``other -> <modality>`` direction.
A negative file that fails to decode rejects its record (counted by reason, like any file).

Example:
    >>> raw = {"__key__": "k", "__url__": "s.tar", "txt": b"a", "neg1.txt": b"c", "neg0.txt": b"b"}
    >>> [(name, value) for name, value, _ in negative_items(raw, ("txt",))]
    [('neg0', 'b'), ('neg1', 'c')]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mmalign.data.decode import decode_value
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.views import stable_hash

_NEGATIVE = re.compile(r"^neg(\d+)\.(.+)$")


def negative_items(
    raw: Mapping[str, Any],
    alternatives: Sequence[str],
    limits: RecordLimits = DEFAULT_LIMITS,
    kind: str | None = None,
) -> list[tuple[str, Any, int]]:
    """``(name, decoded value, group)`` of each ``neg<i>.<ext>`` file of the modality whose
    extensions are ``alternatives``, in ``i`` order, decoded as its tower's type ``kind``
    reads them; the group is a hash of shard, key and name."""
    found = []
    for name in raw:
        match = _NEGATIVE.match(name)
        if match and match.group(2) in alternatives:
            found.append((int(match.group(1)), name))
    items = []
    for number, name in sorted(found):
        label = f"neg{number}"
        group = stable_hash(f"negative:{raw['__url__']}:{raw['__key__']}:{label}")
        items.append((label, decode_value(name, raw[name], limits, kind), group))
    return items
