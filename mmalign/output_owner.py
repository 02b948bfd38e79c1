"""Which folders a command may write: a new or empty one, or its own earlier output.

A command that writes a folder leaves a record there (:data:`RECORD`): the command, and each
file it wrote with its size. Before writing, :func:`check_output` accepts a path that does not
exist, an empty folder, or a folder whose record names the same command and describes what is
there: every file is listed with its size, or named as that command names the files it keeps
rewriting (:attr:`Output.patterns`: the shards it writes, the logs a run appends to).
Anything else is refused with one :class:`~mmalign.errors.UserError` naming the flag and the
first foreign file, and left as it was: a folder of the user's files, one holding a copied
record or ``summary.json``, a file the user added to an earlier output, another command's
output. A folder inside that holds a record of its own (an eval report in a run, a
conversion kept beside it) is that command's and is passed over, except by a command that
replaces the whole folder (:attr:`Output.replaced`). The folder may never be a source of the
command: ``--out`` equal to a source, holding it or (unless :attr:`Output.nested`) inside it
is refused, paths compared resolved.

Example:
    >>> import tempfile
    >>> owner = Output("prep group-shards", "--out", ("data-*.tar",))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = check_output(Path(tmp) / "out", owner)
    ...     out.mkdir()
    ...     _ = (out / "data-000000.tar").write_bytes(b"shard")
    ...     record_output(out, owner)
    ...     check_output(out, owner) == out  # its own output: may be replaced
    ...     _ = (out / "notes.txt").write_text("mine")
    ...     check_output(out, owner)
    Traceback (most recent call last):
    ...
    mmalign.errors.UserError: .../out holds notes.txt, which prep group-shards did not write ...
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.errors import UserError
from mmalign.files import LinkError, read_json, refuse_links, write_json

RECORD = ".mmalign-output.json"
"""The record of the command that wrote a folder: ``{"tool": ..., "files": {name: size}}``."""
LEFTOVER = re.compile(r"\.(tmp-|old-|lock).*|\..*\.tmp.*")
"""Hidden names of the writers' own locks and interrupted writes (``.tmp-model``,
``.old-model``, ``.lock``, :func:`~mmalign.files.atomic_write`'s ``.config.yaml.tmp``)."""


@dataclass(frozen=True)
class Output:
    """The command that owns an output folder, as its messages name it.

    ``tool`` names the command (``"convert --to onnx"``), ``flag`` the option or config field
    of the folder (``"--out"``, ``"train.output"``); ``patterns`` name the files it rewrites
    after recording them (``fnmatch`` patterns of relative paths, ``*`` within one folder;
    ``"checkpoints/"``: every file under that folder); ``nested`` lets the folder lie inside a
    source (an eval report in ``MODEL/eval``); ``replaced``: the command replaces the folder
    whole (a converter), so a link there is refused rather than replaced (the others write
    into the folder a link points to); ``folder`` names the folder in the message about a
    link inside it (:func:`~mmalign.files.refuse_links`, checked first).
    """

    tool: str
    flag: str
    patterns: tuple[str, ...] = ()
    nested: bool = False
    replaced: bool = False
    folder: str = "output directory"


def _files(directory: Path, nested: bool = True) -> Iterator[str]:
    """The relative names of the files under ``directory`` (no link followed), but the record
    and the writers' leftovers; without ``nested``, none inside a folder that holds a record of
    its own (another command's output kept there: ``RUN/eval``, a conversion in a run)."""
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(
            folder
            for folder in folders
            if not LEFTOVER.fullmatch(folder)
            and (nested or not os.path.isfile(os.path.join(root, folder, RECORD)))
        )
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != RECORD and not LEFTOVER.fullmatch(name):
                yield relative


def _matches(name: str, pattern: str) -> bool:
    """Whether the relative file name ``name`` is one that ``pattern`` names (a folder
    ``pattern`` ending in ``/``: every file under it)."""
    if pattern.endswith("/"):
        return name.startswith(pattern)
    return name.count("/") == pattern.count("/") and fnmatch.fnmatch(name, pattern)


def _refuse_sources(directory: Path, owner: Output, sources: Iterable[str | Path]) -> None:
    """A :class:`UserError` when ``directory`` is, holds or lies inside a source; a
    :class:`~mmalign.files.LinkError` when it is a link placed inside one (``MODEL/eval``
    linked to a folder elsewhere: no file is written through a link inside the input)."""
    out, place = directory.resolve(), directory.parent.resolve() / directory.name
    for source in sources:
        read = Path(source).resolve()
        inside = not owner.nested and read in out.parents
        if out == read or out in read.parents or inside:
            where = "lies inside" if inside else "holds" if out != read else "is"
            raise UserError(
                f"{directory} {where} the input {source} of {owner.tool} ({owner.flag}); "
                "write the output to a folder of its own"
            )
        if directory.is_symlink() and read in place.parents:
            raise LinkError(
                f"{directory} is a symbolic link (to {os.readlink(directory)}) inside the "
                f"input {source} ({owner.flag}); mmalign writes no file through a link there: "
                "name the folder it points to, or remove the link"
            )


def _refuse_foreign(directory: Path, owner: Output, record: Any) -> None:
    """A :class:`UserError` naming the first file of ``directory`` that ``record`` (the
    folder's record) does not describe as ``owner``'s."""
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        names = sorted(p.name for p in directory.iterdir() if not LEFTOVER.fullmatch(p.name))
        raise UserError(
            f"{directory} holds files that {owner.tool} did not write ({', '.join(names[:3])}) "
            f"({owner.flag}); pick a new or empty folder"
        )
    if record.get("tool") != owner.tool:
        raise UserError(
            f"{directory} holds the output of {record.get('tool')}, not of {owner.tool} "
            f"({owner.flag}); pick a new or empty folder"
        )
    for name in _files(directory, nested=owner.replaced):  # what the command would delete
        if any(_matches(name, pattern) for pattern in owner.patterns):
            continue
        size = record["files"].get(name)
        if size is None or size != (directory / name).lstat().st_size:
            what = (
                f"which {owner.tool} did not write"
                if size is None
                else f"changed since {owner.tool} wrote it"
            )
            raise UserError(
                f"{directory} holds {name}, {what} ({owner.flag}); move it out of the "
                "folder, or pick a new or empty folder"
            )


def check_output(directory: str | Path, owner: Output, sources: Iterable[str | Path] = ()) -> Path:
    """``directory`` as a :class:`Path` when ``owner`` may write there (the module docstring);
    else a :class:`~mmalign.errors.UserError` naming ``owner.flag``. Only reads."""
    directory = Path(directory)
    if (owner.replaced and directory.is_symlink()) or (
        directory.exists() and not directory.is_dir()
    ):
        raise UserError(
            f"{directory} exists and is not a folder ({owner.flag}); {owner.tool} writes a "
            "folder: pick a path that does not exist"
        )
    _refuse_sources(directory, owner, sources)
    if not directory.exists():
        return directory
    refuse_links(directory, owner.folder, owner.flag)
    entries = [path for path in directory.iterdir() if not LEFTOVER.fullmatch(path.name)]
    # a replaced folder must hold no file and no folder (even empty) that is not the command's
    if any(_files(directory)) or (owner.replaced and entries):
        try:
            record = read_json(directory / RECORD)
        except (OSError, ValueError):
            record = None
        _refuse_foreign(directory, owner, record)
    return directory


def claim_output(directory: str | Path, owner: Output, sources: Iterable[str | Path] = ()) -> Path:
    """:func:`check_output`, then create ``directory`` and record ``owner`` there (listing
    what is there now), so that files it writes before failing stay its own on a re-run."""
    directory = check_output(directory, owner, sources)
    directory.mkdir(parents=True, exist_ok=True)
    record_output(directory, owner)
    return directory


def record_output(directory: Path, owner: Output) -> None:
    """Write the record of ``owner`` in ``directory``, listing every file there now."""
    files = {name: (directory / name).lstat().st_size for name in _files(directory, False)}
    write_json(directory / RECORD, {"tool": owner.tool, "files": files})


def adopt_output(directory: Path, owner: Output) -> bool:
    """Record ``owner`` in ``directory`` when it has no record yet and every file there is one
    that ``owner`` names by its patterns (a folder an mmalign older than the records wrote;
    the caller checks the rest of the evidence); returns whether it did."""
    if (directory / RECORD).exists() or not directory.is_dir():
        return False
    if not all(any(_matches(name, p) for p in owner.patterns) for name in _files(directory)):
        return False
    record_output(directory, owner)
    return True


def remove_unused(directory: Path) -> None:
    """Remove ``directory`` when it holds no file but a record and leftovers: made for a
    command that failed before it wrote anything."""
    if directory.is_dir() and not directory.is_symlink() and not any(_files(directory)):
        shutil.rmtree(directory, ignore_errors=True)
