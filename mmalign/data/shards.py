"""Shard specifications to lists of shard URLs.

A specification is brace notation (``data/train-{000000..000127}.tar``), a glob
(``data/train-*.tar``, ``data/**/*.tar``: matching files, sorted), a directory (every ``*.tar``
inside, sorted), a list of these, or any URL webdataset opens (``pipe:``, ``http://``, ...).
Brace expansion is webdataset's own and comes first (``data/{a,b}/*.tar``); URLs are passed
through unchecked and opened later by webdataset's openers.

Example:
    >>> expand_shards("pipe:cat data/train-{0..1}.tar")
    ['pipe:cat data/train-0.tar', 'pipe:cat data/train-1.tar']
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def is_url(spec: str) -> bool:
    """Whether ``spec`` is a URL (``pipe:``, ``http://``, ``s3://``, ``file:``) and not a path."""
    return bool(_URL.match(spec)) and not Path(spec).exists()


_GLOB = re.compile(r"[*?[]")


def _directory(path: str, field: str) -> list[str]:
    found = sorted(str(shard) for shard in Path(path).glob("*.tar"))
    if not found:
        raise FileNotFoundError(
            f"{field}: directory {path} holds no *.tar shards; point {field} at a directory "
            "of shards, a glob such as data/*/train-*.tar or a brace pattern such as "
            "data/train-{000000..000007}.tar"
        )
    return found


def _matches(pattern: str, field: str) -> list[str]:
    found = sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise FileNotFoundError(
            f"{field}: the glob {pattern!r} matches no file; fix the pattern in {field}"
        )
    return [
        url
        for path in found
        for url in (_directory(path, field) if Path(path).is_dir() else [path])
    ]


def _expand_one(spec: str, field: str) -> list[str]:
    if is_url(spec):
        return expand_urls(spec)
    urls, missing = [], []
    for path in expand_urls(spec):
        if Path(path).is_dir():
            urls += _directory(path, field)
        elif Path(path).is_file():
            urls.append(path)
        elif _GLOB.search(path):
            urls += _matches(path, field)
        elif path.endswith(("/", os.sep)):
            raise FileNotFoundError(
                f"{field}: directory {path} does not exist; fix {field} or create the shards"
            )
        else:
            missing.append(path)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise FileNotFoundError(
            f"{field}: {len(missing)} of {len(urls) + len(missing)} shards of {spec!r} do not "
            f"exist: {shown}; fix the pattern in {field} or create the shards (e.g. mmalign "
            "prep make-demo)"
        )
    return urls


def expand_shards(spec: str | Sequence[str], field: str = "shards") -> list[str]:
    """Expand a shard specification into shard URLs; local shards must exist.

    ``field`` names the config field in error messages (e.g. ``data.train``).

    Example (remote and ``pipe:`` URLs are not checked; local files must exist):
        >>> expand_shards("https://example.org/train-{000000..000001}.tar")
        ['https://example.org/train-000000.tar', 'https://example.org/train-000001.tar']
        >>> expand_shards(["pipe:cat a.tar", "pipe:cat b.tar"])
        ['pipe:cat a.tar', 'pipe:cat b.tar']
    """
    specs = [str(spec)] if isinstance(spec, str | Path) else [str(item) for item in spec]
    urls = [url for item in specs for url in _expand_one(item, field)]
    if not urls:
        raise ValueError(f"{field}: no shards given; set {field} to a pattern, directory or list")
    return urls


def normalize_shards(spec: str | Sequence[str]) -> str | list[str]:
    """``spec`` with each local path made absolute (URLs as they are): the same shards
    written relative or absolute compare equal (e.g. an export's recorded settings).

    Example:
        >>> normalize_shards(["/data/./a.tar", "pipe:cat b.tar"])
        ['/data/a.tar', 'pipe:cat b.tar']
    """
    if isinstance(spec, str | Path):
        spec = str(spec)
        return spec if is_url(spec) else os.path.abspath(spec)
    return [str(normalize_shards(str(item))) for item in spec]
