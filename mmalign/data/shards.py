"""Shard specifications to lists of shard URLs.

A specification is brace notation (``data/train-{000000..000127}.tar``), a directory (every
``*.tar`` inside, sorted), a list of either, or any URL webdataset opens (``pipe:``,
``http://``, ...). Brace expansion is webdataset's own; URLs are passed through unchecked
and opened later by webdataset's openers.

Example:
    >>> expand_shards("pipe:cat data/train-{0..1}.tar")
    ['pipe:cat data/train-0.tar', 'pipe:cat data/train-1.tar']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def is_url(spec: str) -> bool:
    """Whether ``spec`` is a URL (``pipe:``, ``http://``, ``s3://``, ``file:``) and not a path."""
    return bool(_URL.match(spec)) and not Path(spec).exists()


def _expand_one(spec: str, field: str) -> list[str]:
    if is_url(spec):
        return expand_urls(spec)
    if Path(spec).is_dir():
        found = sorted(str(path) for path in Path(spec).glob("*.tar"))
        if not found:
            raise FileNotFoundError(
                f"{field}: directory {spec} holds no *.tar shards; point {field} at a directory "
                "of shards or at a brace pattern such as data/train-{000000..000007}.tar"
            )
        return found
    urls = expand_urls(spec)
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise FileNotFoundError(
            f"{field}: {len(missing)} of {len(urls)} shards of {spec!r} do not exist: {shown}; "
            f"fix the pattern in {field} or create the shards (e.g. mmalign prep make-demo)"
        )
    return urls


def expand_shards(spec: str | Sequence[str], field: str = "shards") -> list[str]:
    """Expand a shard specification into shard URLs; local shards must exist.

    ``field`` names the config field in error messages (e.g. ``data.train``).

    Example:
        >>> expand_shards(["a.tar", "b.tar"])  # doctest: +SKIP
        ['a.tar', 'b.tar']
    """
    specs = [str(spec)] if isinstance(spec, str | Path) else [str(item) for item in spec]
    urls = [url for item in specs for url in _expand_one(item, field)]
    if not urls:
        raise ValueError(f"{field}: no shards given; set {field} to a pattern, directory or list")
    return urls
