"""Whether the record extensions given with ``--field`` occur in the shards at all, read from
the tar headers before any record is decoded: ``--field labs=zzz`` is one error naming the
flag and the extensions the records have, not an export with no ``labs`` row.

The local shards are scanned in order until every given modality was seen (usually within the
first shard), so a modality missing from some records or some shards is never refused; remote
and ``pipe:`` shards are not read.

Example:
    >>> import io, tarfile, tempfile
    >>> shard = tempfile.NamedTemporaryFile(suffix=".tar", delete=False).name
    >>> with tarfile.open(shard, "w") as tar:
    ...     tar.addfile(tarfile.TarInfo("sample0.npy"), io.BytesIO(b""))
    >>> try:
    ...     check_fields_present([shard], {"labs": "zzz"})
    ... except UserError as error:
    ...     print(str(error).split(" (")[0])
    no record of the 1 shard has the labs field 'zzz'
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmalign.config.extensions import parse_alternatives
from mmalign.data.shards import is_url
from mmalign.errors import UserError

_SHOWN = 12


def _extensions(url: str) -> set[str]:
    """The record extensions (lower case, after the first dot of a member's name) in the tar
    ``url``; empty when it cannot be read (the export counts that shard)."""
    try:
        with tarfile.open(url) as tar:
            names = [Path(member.name).name for member in tar if member.isfile()]
    except (OSError, tarfile.TarError):
        return set()
    return {name.split(".", 1)[1].lower() for name in names if "." in name}


def _matches(alternatives: Sequence[str], extensions: set[str]) -> bool:
    return any(ext == alt or ext.endswith("." + alt) for alt in alternatives for ext in extensions)


def check_fields_present(
    urls: Sequence[str], fields: Mapping[str, str], flag: str = "--field"
) -> None:
    """Raise a :class:`~mmalign.errors.UserError` naming ``flag`` when a modality's
    extensions (``fields``: ``{modality: "jpg;png"}``) occur in no record of the local
    shards ``urls`` (``--metadata``: ``{extension: extension}``, named alone)."""
    local = [url for url in urls if not is_url(url)]
    wanted = {name: parse_alternatives(spec) for name, spec in fields.items()}
    seen: set[str] = set()
    for url in local:
        seen |= _extensions(url)
        wanted = {name: alts for name, alts in wanted.items() if not _matches(alts, seen)}
        if not wanted:
            return
    if not local or not seen:
        return
    name = next(iter(wanted))
    shards = "1 shard" if len(local) == 1 else f"{len(local)} shards"
    raise UserError(
        f"no record of the {shards} has the {name} field '{fields[name]}' "
        f"({flag} {f'{name}={fields[name]}' if flag == '--field' else fields[name]}); "
        "give one of the records' fields: "
        f"{', '.join(sorted(seen)[:_SHOWN])}"
    )
