"""The one-line message of a file-system error (by errno): which path, what is wrong and what
to do, with advice that fits the command. The command line shows it instead of a traceback.

A write that fails (a full disk, a file beyond the size limit) names no file: the writers
name it (:func:`mmalign.files.naming_errors`); an error that still names none is put on the
command's ``--out``. The advice mentions only flags the command has: another ``--out``, a
smaller ``--chunk-size`` / ``--maxcount`` / ``--maxsize`` for a file too large.

Example:
    >>> print(path_problem(OSError(27, "File too large", "out/a.tar"), {"out": "out"}))
    out/a.tar would grow beyond the largest file its file system allows (out/a.tar); write to \
another file system (another --out)
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FILE_SYSTEM_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.EROFS: ("is on a read-only file system", "write to a writable directory"),
    errno.EFBIG: (
        "would grow beyond the largest file its file system allows",
        "write to another file system",
    ),
    errno.ENOSPC: (
        "cannot be written: no space left on its device",
        "free space on the disk holding {path}",
    ),
    errno.EDQUOT: (
        "cannot be written: the disk quota is used up",
        "free space within the quota on the disk holding {path}",
    ),
    errno.ENAMETOOLONG: ("has a name too long for its file system", "use a shorter name"),
    errno.EEXIST: ("exists already as a file", "remove it or name another path"),
    errno.ELOOP: ("is a symbolic link (or a loop of them)", "pass the real path"),
    errno.EACCES: ("cannot be opened: permission denied", "check its permissions"),
    errno.EPERM: ("cannot be changed: operation not permitted", "check its permissions"),
}
"""What a file-system error (by errno) means for the path it names, and what to do."""

ANOTHER_OUTPUT = (errno.EROFS, errno.EFBIG, errno.ENOSPC, errno.EDQUOT)
"""The errors that writing to another ``--out`` avoids."""

RETRIED = (errno.ENOSPC, errno.EDQUOT)
"""The errors after which the same command, run again, finishes."""

SPLIT_FLAGS = {"chunk_size": "--chunk-size", "maxcount": "--maxcount", "maxsize": "--maxsize"}
"""The options (by argparse dest) that cut an output into smaller files."""


def _advice(number: int, todo: str, path: str, options: Mapping[str, Any]) -> str:
    """``todo`` completed for the command whose parsed ``options`` these are."""
    advice = todo.format(path=path)
    if number in ANOTHER_OUTPUT and options.get("out") is not None:
        advice += " (another --out)"
    splits = [flag for dest, flag in SPLIT_FLAGS.items() if dest in options]
    if number == errno.EFBIG and splits:
        advice += f", or split the output: a smaller {' or '.join(splits)}"
    if number in RETRIED:
        advice += ", and run the same command again"
    return advice


def _inside(path: str, out: object) -> bool:
    """Whether ``path`` is in the output folder ``out`` (a file the command writes)."""
    return out is not None and Path(str(out)).resolve() in Path(path).resolve().parents


def path_problem(error: OSError, options: Mapping[str, Any] | None = None) -> str | None:
    """The one-line message of a file-system error: what is wrong with which path and what
    to do; ``None`` for an error that is no file-system problem (a bug: its traceback shows).
    ``options`` are the command's parsed arguments (``vars(args)``): an error naming no file
    is put on their ``out``, and the advice names only flags among them.

    Example:
        >>> path_problem(IsADirectoryError(21, "Is a directory", "data/classes"))
        'data/classes is a directory, not a file (data/classes); pass the file itself'
        >>> print(path_problem(IsADirectoryError(21, "Is a directory", "ev/a.json"), {"out": "ev"}))
        ev/a.json is a directory, not a file (ev/a.json); remove it or write to another --out
        >>> path_problem(OSError(30, "Read-only file system", "/ro/run"))
        '/ro/run is on a read-only file system (/ro/run); write to a writable directory'
        >>> path_problem(OSError(28, "No space left on device"), {"out": "shards"})
        'a file in shards cannot be written: no space left on its device (--out); free space \
on the disk holding shards (another --out), and run the same command again'
    """
    if error.filename is None and error.errno is None:  # raised with a message of its own
        return " ".join(str(error).split())
    options = options or {}
    out = options.get("out")
    path = str(error.filename or out or "")
    shown = str(error.filename) if error.filename else f"a file in {out}" if out else "a file"
    if isinstance(error, IsADirectoryError):
        todo = (
            "remove it or write to another --out" if _inside(path, out) else "pass the file itself"
        )
        return f"{shown} is a directory, not a file ({path}); {todo}"
    if isinstance(error, NotADirectoryError):
        return f"a part of {shown} is a file, not a directory ({path}); check the path"
    if isinstance(error, FileNotFoundError):
        return f"{shown} does not exist ({path}); check the path"
    problem = FILE_SYSTEM_PROBLEMS.get(error.errno or 0)
    if problem is None:
        return None
    what, todo = problem
    where = f" ({error.filename})" if error.filename else " (--out)" if out else ""
    return f"{shown} {what}{where}; {_advice(error.errno or 0, todo, path or 'it', options)}"
