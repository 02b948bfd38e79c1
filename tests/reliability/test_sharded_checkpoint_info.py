"""A damaged ``sharded.json`` (a directory, not JSON, not UTF-8, no world size) or
``sharded/.metadata`` (empty, not a pickle, truncated) of an FSDP checkpoint is one error
naming the file and the fix, never a traceback or the wrong advice ("not saved sharded")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.errors import UserError
from mmalign.training.parallel.sharded_checkpoint import INFO, SHARDS, load, read_info


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("directory", "cannot be read"),
        ("not json", "cannot be read"),
        ("binary", "cannot be read"),
        ("a list", "holds no world_size"),
        ("world_size text", "holds no world_size"),
    ],
)
def test_damaged_info_names_the_file(tmp_path: Path, damage: str, message: str) -> None:
    info = tmp_path / INFO
    if damage == "directory":
        info.mkdir()
    elif damage == "binary":
        info.write_bytes(b"\xff\xfe\x00")
    else:
        text = {
            "not json": "{world_size: 2",
            "a list": "[2]",
            "world_size text": '{"world_size": "2"}',
        }
        info.write_text(text[damage])
    with pytest.raises(UserError, match=f"{info}.*{message}.*remove {tmp_path}"):
        read_info(tmp_path)


def test_missing_info_still_says_not_sharded(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="was not saved sharded"):
        read_info(tmp_path)
    (tmp_path / INFO).write_text('{"world_size": 2, "optimizer": {}}')
    assert read_info(tmp_path)["world_size"] == 2


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a pickle", b"\x80\x02}q\x00(X"],
    ids=["empty", "text", "truncated"],
)
def test_damaged_metadata_names_the_file(tmp_path: Path, payload: bytes) -> None:
    """DCP's ``.metadata`` read through :func:`load` (which DCP wraps per rank)."""
    (tmp_path / INFO).write_text('{"world_size": 1, "optimizer": {}}')
    (tmp_path / SHARDS).mkdir()
    metadata = tmp_path / SHARDS / ".metadata"
    metadata.write_bytes(payload)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    named = f"the checkpoint metadata cannot be read: .* \\({metadata}\\); .*remove {tmp_path} "
    with pytest.raises(UserError, match=named):
        load(tmp_path, model, optimizer, world_size=1)
