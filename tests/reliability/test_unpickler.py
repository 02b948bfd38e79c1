"""The reader of DCP's ``.metadata`` (sharded FSDP checkpoints) sets state only on fresh
instances of torch's checkpoint-metadata dataclasses: a planted file that uses pickle's BUILD
to ``setattr`` on an admitted class (``pathlib.PosixPath``), on a torch constant or on an enum
member is refused, and nothing in the reading process changes; real metadata still loads.
Every field of what was unpickled is checked before use (a ``storage_meta`` that is a class,
a path or a dtype is refused in one line naming the file), and a name in the file never makes
Python import a module (torch's lazy submodules)."""

from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from mmalign.errors import UserError
from mmalign.training.parallel.sharded_checkpoint import SafeReader

PLANTED = "mmalign_planted"


def real_metadata() -> Metadata:
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))
    tensor = TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.float32),
        size=torch.Size([2, 3]),
        chunks=[chunk],
    )
    storage = {MetadataIndex("model/w", (0, 0)): _StorageInfo("__0_0.distcp", 0, 24)}
    meta = StorageMeta(checkpoint_id=pathlib.PosixPath("run/sharded"), save_id="s")
    return Metadata({"model/w": tensor}, storage_data=storage, storage_meta=meta)


def build_on(global_name: bytes, body: bytes) -> bytes:
    """A protocol-2 pickle that pushes ``global_name`` (``b"pathlib\\nPosixPath"``), sets
    ``PLANTED = 1`` on it with BUILD (slot state: setattr), pops it, then holds ``body``."""
    planted = PLANTED.encode()
    attack = b"c" + global_name + b"\nN}X" + len(planted).to_bytes(4, "little") + planted
    attack += b"K\x01s\x86b0"  # {PLANTED: 1}, (None, state), BUILD, POP
    return b"\x80\x02" + attack + body[2:]


def read(directory: Path, payload: bytes) -> Any:
    (directory / ".metadata").write_bytes(payload)
    return SafeReader(str(directory)).read_metadata()


def test_real_metadata_loads(tmp_path: Path) -> None:
    loaded = read(tmp_path, pickle.dumps(real_metadata(), protocol=2))
    assert loaded.state_dict_metadata == real_metadata().state_dict_metadata
    assert loaded.storage_data == real_metadata().storage_data
    assert loaded.storage_meta.checkpoint_id == real_metadata().storage_meta.checkpoint_id


@pytest.mark.parametrize(
    ("global_name", "owner"),
    [
        (b"pathlib\nPosixPath", pathlib.PosixPath),  # an admitted class
        (b"collections\nOrderedDict", __import__("collections").OrderedDict),
        (b"torch\nfloat32", torch.float32),  # a torch constant, shared by the whole process
    ],
)
def test_build_on_a_class_or_constant_is_refused(
    tmp_path: Path, global_name: bytes, owner: Any
) -> None:
    body = pickle.dumps(real_metadata(), protocol=2)
    try:
        with pytest.raises(UserError, match="not a checkpoint-metadata instance"):
            read(tmp_path, build_on(global_name, body))
        assert not hasattr(owner, PLANTED)
    finally:
        if PLANTED in getattr(owner, "__dict__", {}):
            delattr(owner, PLANTED)


def test_metadata_written_by_dcp_loads(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model/w": torch.arange(6.0).reshape(2, 3), "optimizer/w/step": torch.tensor(3)}
    with pytest.warns(UserWarning):  # torch: no process group, saved as one process
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    loaded = {name: torch.zeros_like(value) for name, value in state.items()}
    with pytest.warns(UserWarning):
        dcp.load(loaded, storage_reader=SafeReader(str(tmp_path)))
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize(
    "storage_meta",
    [
        pathlib.PosixPath,  # a class: setting load_id on it would change every path
        Metadata,
        pathlib.PosixPath("/x"),  # instances whose load_id cannot be set (a traceback before)
        torch.float32,
        __import__("collections").OrderedDict(),
    ],
    ids=["PosixPath-class", "Metadata-class", "PosixPath", "float32", "OrderedDict"],
)
def test_storage_meta_of_another_type_is_refused(tmp_path: Path, storage_meta: Any) -> None:
    planted = real_metadata()
    planted.storage_meta = storage_meta
    payload = pickle.dumps(planted, protocol=4)  # first: pickling caches __slotnames__
    owners = (pathlib.PosixPath, pathlib.Path, Metadata, StorageMeta)
    before = {owner: dict(vars(owner)) for owner in owners}
    with pytest.raises(UserError) as caught:
        read(tmp_path, payload)
    message = str(caught.value)
    assert "storage_meta, where torch writes a StorageMeta or None" in message
    assert f"({tmp_path / '.metadata'})" in message and "\n" not in message
    assert {owner: dict(vars(owner)) for owner in owners} == before


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("state_dict_metadata", {"w": "x"}, "state_dict_metadata['w']"),
        ("planner_data", {"w": [[[]]]}, "planner_data['w']"),
        ("storage_data", None, "storage_data"),
        ("version", Metadata, "version"),
    ],
)
def test_fields_of_another_type_are_refused(
    tmp_path: Path, field: str, value: Any, where: str
) -> None:
    planted = real_metadata()
    setattr(planted, field, value)
    with pytest.raises(UserError, match=re.escape(f"at {where}, where torch writes")):
        read(tmp_path, pickle.dumps(planted, protocol=4))


def test_a_metadata_file_imports_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    asked: list[str] = []

    def lazy_import(name: str) -> Any:  # torch's module __getattr__ imports submodules
        asked.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", lazy_import, raising=False)
    for name in (b"_inductor", b"onnx", b"_dynamo", b"nonexistent"):
        payload = b"\x80\x04\x8c\x05torch\x94\x8c" + bytes([len(name)]) + name + b"\x94\x93\x94."
        with pytest.raises(UserError, match="is not checkpoint metadata"):
            read(tmp_path, payload)
    assert asked == []
