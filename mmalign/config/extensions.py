"""The one rule for a record extension list (``data.fields`` values, ``--field MODALITY=EXT``):
``;``-separated alternatives, each non-empty, compared in lower case without a leading dot.

The config (``data.fields``), the command line (``--field``) and the decoder that finds a
modality's file in a record all read a list with :func:`parse_alternatives`, so a list one
of them refuses is refused by all, before any work.

Example:
    >>> parse_alternatives("JPG; .png")
    ('jpg', 'png')
"""

from __future__ import annotations


def parse_alternatives(spec: str) -> tuple[str, ...]:
    """``"jpg;png"`` -> ``("jpg", "png")`` (lower case, a leading dot removed); a
    ``ValueError`` for a list with an empty entry (``""``, ``"jpg;"``, ``";;"``).

    Example:
        >>> parse_alternatives(";;")
        Traceback (most recent call last):
        ...
        ValueError: extension list ';;' has an empty entry; write e.g. 'jpg;png'
    """
    alternatives = tuple(part.strip().lstrip(".").lower() for part in spec.split(";"))
    if not all(alternatives):
        raise ValueError(f"extension list {spec!r} has an empty entry; write e.g. 'jpg;png'")
    return alternatives


def check_alternatives(spec: str) -> str:
    """``spec`` itself once :func:`parse_alternatives` reads it (a pydantic validator).

    Example:
        >>> check_alternatives("jpg;png")
        'jpg;png'
    """
    parse_alternatives(spec)
    return spec
