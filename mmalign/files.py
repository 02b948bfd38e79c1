"""Files that are either whole or absent, and one job per directory.

- :func:`naming_errors`: a write that fails (a full disk, a file beyond the size limit)
  raises an ``OSError`` naming the file written, not none.
- :func:`atomic_write` / :func:`write_json`: a temporary file, flushed, fsynced, renamed
  over the target, then the folder fsynced: a crash leaves the old file or the new one.
- :func:`replace_directory`: the same for a whole directory (checkpoints, saved models).
- :class:`DirectoryLock`: an exclusive lock file holding the PID and host of the job that
  uses a directory (a training run, an export); a lock left by a dead process on the same
  host is taken over.
- :func:`clear_old_shards`: the shards of an earlier output of the same tool are removed
  before new ones are written (the folder checked as the tool's by
  :mod:`mmalign.output_owner` first).
- :func:`refuse_links` / :func:`open_append`: no file of a run or export directory is written
  through a symbolic link. A link inside one is refused with a :class:`LinkError` naming it
  when the job takes the directory; appended files are opened with ``O_NOFOLLOW`` and
  temporary files are created afresh (``O_EXCL``), so a link planted later is not followed
  either.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_json(Path(tmp) / "a.json", {"x": 1})
    ...     read_json(Path(tmp) / "a.json")
    {'x': 1}
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from safetensors import SafetensorError

from mmalign.errors import UserError

LOCK_NAME = ".lock"


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry list to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """fsync every file of ``directory`` (recursively), then the directories themselves."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(directory)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How safetensors' ``SafetensorError`` quotes the ``OSError`` of a failed write."""


@contextlib.contextmanager
def naming_errors(path: str | Path | Callable[[], str | Path | None]) -> Iterator[None]:
    """An ``OSError`` with an errno but no file name (what ``write()``, ``flush()`` and
    ``close()`` raise: a full disk, a file beyond the size limit) raised in the block is
    raised again naming ``path`` (or what the callable ``path`` returns then: the file a
    writer has open), so that the one-line error says which file.

    Example:
        >>> with naming_errors("out/data-000000.tar"):
        ...     raise OSError(errno.EFBIG, "File too large")
        Traceback (most recent call last):
        ...
        OSError: [Errno 27] File too large: 'out/data-000000.tar'
    """
    try:
        yield
    except OSError as error:
        named = path() if callable(path) else path
        if error.filename is not None or error.errno is None or named is None:
            raise
        raise OSError(error.errno, error.strerror, str(named)) from error
    except SafetensorError as error:  # its I/O errors carry the errno only in their text
        found = _OS_ERROR.search(str(error))
        if found is None:
            raise
        named = path() if callable(path) else path
        number = int(found[1])
        raise OSError(number, os.strerror(number), None if named is None else str(named)) from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], tag: str = "") -> None:
    """Write ``path`` through a temporary file: write, flush, fsync, rename, fsync the folder.

    ``tag`` makes the temporary name unique per writer (processes writing the same file). A
    failed write (a full disk, a file beyond the size limit) or rename (a folder where
    ``path`` belongs) removes the temporary file and raises an ``OSError`` that names ``path``
    (``write()`` errors name no file, the rename's name the temporary one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{tag}")
    temporary.unlink(missing_ok=True)  # a leftover, or a link planted under its name
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with naming_errors(path), os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # the old file stays; no temporary is left
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename == str(temporary):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    fsync_path(path.parent)


def json_text(data: Any, indent: int | None = 2, sort_keys: bool = True) -> str:
    """``data`` as strict JSON (RFC 8259 has no NaN or Infinity, which Python's ``json``
    writes by default and other readers refuse): a non-finite float is written as ``null``.

    Example:
        >>> json_text({"cut": float("-inf"), "acc": [0.5, float("nan")]}, indent=None)
        '{"acc": [0.5, null], "cut": null}'
    """
    return json.dumps(_finite(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` with each non-finite float in it (in mappings, lists, tuples) ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_json(
    path: Path,
    data: Mapping[str, Any] | list[Any],
    tag: str = "",
    *,
    indent: int | None = 2,
    sort_keys: bool = True,
) -> None:
    """Atomically write ``data`` as strict, indented JSON (:func:`json_text`; keys sorted
    unless ``sort_keys`` is false)."""
    write_text(path, json_text(data, indent, sort_keys) + "\n", tag)


def write_text(path: Path, text: str, tag: str = "") -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda handle: handle.write(text.encode()), tag)


def read_json(path: Path) -> Any:
    """The JSON content of ``path``, or ``None`` when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def replace_directory(temporary: Path, final: Path) -> Path:
    """Move the finished directory ``temporary`` to ``final``, replacing what was there.

    The new tree is fsynced first; an old ``final`` is renamed aside (``.old-<name>``) and
    removed only after the rename, so a crash leaves either the old or the new directory
    (plus a leftover ``.old-``/``.tmp-`` directory that the next writer removes).
    """
    fsync_tree(temporary)
    previous = final.with_name(f".old-{final.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)
    fsync_path(final.parent)
    return final


def clear_old_shards(directory: Path, name: str) -> None:
    """Remove the ``NAME-*.tar`` shards in ``directory`` before new ones are written there:
    the folder must be the tool's own output (:func:`mmalign.output_owner.check_output`), so
    that no shard the tool did not write is deleted.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "data-000000.tar").write_bytes(b"old")
        ...     clear_old_shards(Path(tmp), "data")
        ...     sorted(Path(tmp).iterdir())
        []
    """
    for path in sorted(directory.glob(f"{name}-*.tar")):
        path.unlink()


class LinkError(UserError, OSError):
    """A run or export directory holds a symbolic link where mmalign writes."""


def refuse_links(directory: Path, what: str, flag: str) -> None:
    """Raise :class:`LinkError` naming the first symbolic link inside ``directory`` (files and
    folders, at any depth, no link followed); ``what`` and ``flag`` name the directory in the
    message (``"run directory"``, ``"train.output"``). ``directory`` itself may be a link.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (Path(tmp) / "train.log").symlink_to("/etc/hostname")
        ...     refuse_links(Path(tmp), "run directory", "train.output")
        Traceback (most recent call last):
        ...
        mmalign.files.LinkError: ... is a symbolic link (to /etc/hostname) inside the run ...
    """
    for root, folders, files in os.walk(directory):  # never descends into linked folders
        for name in sorted(folders + files):
            path = Path(root) / name
            if path.is_symlink():
                raise LinkError(
                    f"{path} is a symbolic link (to {os.readlink(path)}) inside the {what} "
                    f"({flag}); mmalign writes no file through a link there: replace it with "
                    "a regular file or folder, or remove it"
                )


def open_append(path: Path) -> IO[str]:
    """``path`` opened for appending text without following a symbolic link (a link there is
    a :class:`LinkError`)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise LinkError(
            f"{path} is a symbolic link; mmalign appends to no file through a link: replace "
            "it with a regular file, or remove it"
        ) from None
    return os.fdopen(descriptor, "a")


class LockError(UserError, RuntimeError):
    """A directory is in use by another job, or holds work that would be overwritten."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An exclusive lock file ``DIRECTORY/<name>`` holding the PID and host of its holder.

    ``user`` and ``advice`` word the error (``DirectoryLock(out, user="export",
    advice="export into another directory")``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, DirectoryLock(Path(tmp)) as lock:
        ...     lock.path.name
        '.lock'
    """

    def __init__(
        self,
        directory: Path,
        name: str = LOCK_NAME,
        user: str = "training run",
        advice: str = "set train.output to another directory",
    ) -> None:
        self.path = Path(directory) / name
        self.user = user
        self.advice = advice
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (
                    owner[0] != socket.gethostname() or _process_alive(owner[1])
                ):
                    raise LockError(
                        f"{self.path.parent} is used by another {self.user} (PID {owner[1]} on "
                        f"{owner[0]}); wait for it to finish or {self.advice} (delete "
                        f"{self.path} if that {self.user} is gone)"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return
        raise LockError(f"could not take the lock {self.path}; another job raced for it")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
