"""webdataset's ``ShardWriter`` whose failed writes name the shard being written: a full disk
or a shard beyond the file-size limit raises an ``OSError`` naming ``OUT/NAME-000003.tar``
(``write()`` errors name no file), so the command line's one-line error says which. A block
that fails (that error, a bad record, Ctrl-C) removes the shards it wrote: no cut shard is
left for a later reader or a rerun to trip over.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with ShardWriter(f"{tmp}/data-%06d.tar", maxcount=2, verbose=0) as writer:
    ...         for key in "abc":
    ...             writer.write({"__key__": key, "txt": key})
    ...     sorted(path.name for path in Path(tmp).glob("*.tar"))
    ['data-000000.tar', 'data-000001.tar']
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds

from mmalign.files import naming_errors


class ShardWriter(wds.ShardWriter):
    """``webdataset.ShardWriter`` (same arguments) whose write and close errors name the
    shard file open at the time; used as a context manager, it removes its shards when the
    block fails."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.written: list[str] = []  # the shards opened so far, in order
        super().__init__(*args, **kwargs)

    def next_stream(self) -> None:
        """Finish the current shard and open the next."""
        super().next_stream()
        self.written.append(str(self.fname))

    def write(self, obj: dict[str, Any]) -> None:
        """Write one record (to a new shard when the current one is full)."""
        with naming_errors(lambda: self.fname):
            super().write(obj)

    def close(self) -> None:
        """Finish the last shard."""
        with naming_errors(lambda: self.fname):
            super().close()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the error that stopped the block is the one shown
            super().close()
        for shard in self.written:
            Path(shard).unlink(missing_ok=True)
