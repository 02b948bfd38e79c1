"""The safe reading of DCP's ``.metadata`` pickle (the map of a sharded checkpoint).

``.metadata`` is a pickle written by ``torch.distributed.checkpoint``. It is read with an
unpickler that

- resolves a name only from an allow-list of objects this module has already imported
  (torch's checkpoint-metadata dataclasses, ``torch.Size``, torch's dtypes and memory
  formats, ``pathlib`` paths, ``OrderedDict``): a file never makes Python import anything, nor
  run any code of its own;
- sets state (pickle's ``BUILD``) only on fresh instances of those dataclasses: never on a
  class, a torch constant or an enum member;

and what it returns is then checked field by field against the shape torch writes
(:func:`check_metadata`) before anything else touches it: a planted ``storage_meta`` that is
a class, a path or a dtype is refused, so no caller ever sets an attribute on it.

Example:
    >>> import io, pickle
    >>> from torch.distributed.checkpoint.metadata import Metadata
    >>> read_metadata(io.BytesIO(pickle.dumps(Metadata(state_dict_metadata={"w": None}))))
    Traceback (most recent call last):
    ...
    mmalign.training.parallel.checkpoint_metadata.MetadataError: holds NoneType at \
state_dict_metadata['w'], where torch writes a TensorStorageMetadata
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import pickle
from collections.abc import Callable
from typing import IO, Any, ClassVar

import torch
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.serialization import _get_layout

_StorageInfo = filesystem._StorageInfo

_DATACLASSES = (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    BytesStorageMetadata,
    _StorageInfo,
)
"""The dataclasses whose fresh instances a ``BUILD`` may fill."""

ADMITTED: dict[tuple[str, str], Any] = {
    **{(kind.__module__, kind.__name__): kind for kind in _DATACLASSES},
    (dcp_metadata.__name__, "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch", "Size"): torch.Size,
    ("pathlib", "Path"): pathlib.Path,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "WindowsPath"): pathlib.WindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("torch", name): value
        for name, value in vars(torch).items()  # vars: no lazy submodule import
        if isinstance(value, torch.dtype | torch.memory_format)
    },
}
"""Every ``(module, name)`` DCP's ``.metadata`` may name, and the object it stands for: all
imported here, so resolving a name never imports a module."""


class MetadataError(ValueError):
    """``.metadata`` is no checkpoint metadata: a foreign, damaged or planted pickle."""


_BUILD = pickle._Unpickler.dispatch[pickle.BUILD[0]]


def _checked_build(unpickler: Any) -> None:
    """pickle's ``BUILD`` opcode, only on a fresh instance of a metadata dataclass."""
    stack = unpickler.stack
    target = stack[-2] if len(stack) >= 2 else None
    if type(target) not in _DATACLASSES:
        raise pickle.UnpicklingError(
            f"the metadata sets state on {target!r}, which is not a checkpoint-metadata instance"
        )
    _BUILD(unpickler)


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's ``.metadata`` from :data:`ADMITTED` objects only; state is set only on
    instances of the dataclasses (pickle's pure-Python unpickler, whose opcode table can be
    narrowed: the C one hands ``BUILD`` any object, a class included)."""

    dispatch: ClassVar = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _checked_build}

    def find_class(self, module: str, name: str) -> Any:
        found = ADMITTED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")
        return found


def read_metadata(handle: IO[bytes]) -> Metadata:
    """The checked :class:`~torch.distributed.checkpoint.metadata.Metadata` pickled in
    ``handle``; a :class:`MetadataError` saying what is wrong otherwise (see the module's
    example)."""
    try:
        loaded = _MetadataUnpickler(handle).load()
    except Exception as error:  # any damage: a truncated, foreign or unreadable pickle
        raise MetadataError(f"cannot be read: {type(error).__name__}: {error}") from None
    check_metadata(loaded)
    return loaded


def _fail(where: str, value: Any, expected: str) -> MetadataError:
    kind = type(value)
    shown = f"the class {value.__qualname__}" if isinstance(value, type) else kind.__name__
    return MetadataError(f"holds {shown} at {where}, where torch writes {expected}")


def _is(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    """A test that a value is exactly of ``kind`` (no subclass, no class object)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return lambda value: type(value) in kinds


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: type(value) in (list, tuple) and all(test(item) for item in value)


_SIZE = _is(torch.Size)
_TEXT = _is(str)
_INT = _is(int)
_FIELDS: dict[type, dict[str, tuple[Callable[[Any], bool], str]]] = {
    ChunkStorageMetadata: {"offsets": (_SIZE, "a torch.Size"), "sizes": (_SIZE, "a torch.Size")},
    TensorProperties: {
        "dtype": (_is(torch.dtype), "a torch.dtype"),
        "layout": (_is(torch.layout), "a torch.layout"),
        "requires_grad": (_is(bool), "a bool"),
        "memory_format": (_is(torch.memory_format), "a torch.memory_format"),
        "pin_memory": (_is(bool), "a bool"),
    },
    StorageMeta: {
        "checkpoint_id": (
            _optional(lambda value: type(value) is str or isinstance(value, os.PathLike)),
            "a path or None",
        ),
        "save_id": (_optional(_TEXT), "a str or None"),
        "load_id": (_optional(_TEXT), "a str or None"),
        "modules": (_list_of(_TEXT), "a list of str"),
    },
    MetadataIndex: {
        "fqn": (_TEXT, "a str"),
        "offset": (_optional(_SIZE), "a torch.Size or None"),
        "index": (_optional(_INT), "an int or None"),
    },
    _StorageInfo: {
        "relative_path": (_TEXT, "a str"),
        "offset": (_INT, "an int"),
        "length": (_INT, "an int"),
        "transform_descriptors": (_optional(_list_of(_TEXT)), "a list of str or None"),
    },
}
"""The fields of the leaf dataclasses and a test of each (with what torch writes there)."""


def _check_instance(value: Any, kind: type, where: str) -> None:
    """``value`` is a ``kind`` instance (exactly) whose state holds only its fields, each of
    the type :data:`_FIELDS` gives."""
    if type(value) is not kind:
        raise _fail(where, value, f"a {kind.__name__}")
    names = {field.name for field in dataclasses.fields(kind)}
    extra = sorted(set(vars(value)) - names)
    if extra:
        raise MetadataError(f"holds a field {extra[0]!r} at {where}, which {kind.__name__} lacks")
    for name, (test, expected) in _FIELDS.get(kind, {}).items():
        field = getattr(value, name)
        if not test(field):
            raise _fail(f"{where}.{name}", field, expected)


def _check_entry(name: str, entry: Any) -> None:
    """One ``state_dict_metadata`` entry: bytes, or a tensor's properties, size and chunks."""
    where = f"state_dict_metadata[{name!r}]"
    if type(entry) is BytesStorageMetadata:
        return _check_instance(entry, BytesStorageMetadata, where)
    _check_instance(entry, TensorStorageMetadata, where)
    _check_instance(entry.properties, TensorProperties, f"{where}.properties")
    if not _SIZE(entry.size):
        raise _fail(f"{where}.size", entry.size, "a torch.Size")
    if type(entry.chunks) is not list:
        raise _fail(f"{where}.chunks", entry.chunks, "a list")
    for chunk in entry.chunks:
        _check_instance(chunk, ChunkStorageMetadata, f"{where}.chunks")
    return None


def _check_planner_data(planner_data: Any) -> None:
    """``None`` or ``{name: (path parts, ...)}`` (str or int parts)."""
    if planner_data is None:
        return
    if type(planner_data) is not dict:
        raise _fail("planner_data", planner_data, "a dict")
    for name, path in planner_data.items():
        if not _TEXT(name) or not _list_of(_is((str, int)))(path):
            raise _fail(f"planner_data[{name!r}]", path, "a tuple of str or int")


def _check_storage_data(storage_data: Any) -> None:
    """``{MetadataIndex: _StorageInfo}`` (where each piece lies; reading needs it)."""
    if type(storage_data) is not dict:
        raise _fail("storage_data", storage_data, "a dict")
    for index, info in storage_data.items():
        _check_instance(index, MetadataIndex, "storage_data (a key)")
        _check_instance(info, _StorageInfo, f"storage_data[{index.fqn!r}]")


def check_metadata(metadata: Any) -> None:
    """A :class:`MetadataError` unless ``metadata`` has the shape torch writes: a
    :class:`~torch.distributed.checkpoint.metadata.Metadata` whose every field (down to each
    chunk) holds the types torch puts there; ``storage_data`` is a dict, ``storage_meta`` is
    ``None`` or a fresh ``StorageMeta``.

    Example:
        >>> import pathlib
        >>> try:
        ...     check_metadata(Metadata({}, storage_data={}, storage_meta=pathlib.Path))
        ... except MetadataError as error:
        ...     print(str(error).split(" at ")[1])
        storage_meta, where torch writes a StorageMeta or None
    """
    if type(metadata) is not Metadata:
        raise _fail("the top level", metadata, "a Metadata")
    _check_instance(metadata, Metadata, "the top level")
    state = metadata.state_dict_metadata
    if type(state) is not dict:
        raise _fail("state_dict_metadata", state, "a dict")
    for name, entry in state.items():
        if not _TEXT(name):
            raise _fail("state_dict_metadata (a key)", name, "a str")
        _check_entry(name, entry)
    _check_planner_data(metadata.planner_data)
    _check_storage_data(metadata.storage_data)
    storage_meta = metadata.storage_meta
    if storage_meta is not None and type(storage_meta) is not StorageMeta:
        raise _fail("storage_meta", storage_meta, "a StorageMeta or None")
    if storage_meta is not None:
        _check_instance(storage_meta, StorageMeta, "storage_meta")
    if not _optional(_TEXT)(metadata.version):
        raise _fail("version", metadata.version, "a str or None")
