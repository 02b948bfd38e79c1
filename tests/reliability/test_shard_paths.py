"""Shard specs: globs, directories (also inside braces), missing paths named as such; the
same shards written relative or absolute are the same export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import tiny_config, write_shards

from mmalign.data import expand_shards
from mmalign.data.exports import read_manifest
from mmalign.data.shards import normalize_shards
from mmalign.export import run_export
from mmalign.training import train


def test_globs_directories_and_missing_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shards(tmp_path / "d" / "x", samples=4, shards=2)
    write_shards(tmp_path / "d" / "y", samples=2, shards=1)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    x = ["d/x/train-000000.tar", "d/x/train-000001.tar"]
    assert expand_shards("d/x/*.tar") == x
    assert expand_shards("d/*/train-00000[0].tar") == [x[0], "d/y/train-000000.tar"]
    assert expand_shards("d/**/*.tar") == [*x, "d/y/train-000000.tar"]
    assert expand_shards("d/{x,y}") == [*x, "d/y/train-000000.tar"]  # directories in braces
    assert expand_shards("d/*") == [*x, "d/y/train-000000.tar"]  # a glob matching directories
    with pytest.raises(FileNotFoundError, match=r"data.train: the glob 'd/\*.tgz' matches no"):
        expand_shards("d/*.tgz", "data.train")
    with pytest.raises(FileNotFoundError, match=r"data\.train: directory nowhere/ does not exist"):
        expand_shards("nowhere/", "data.train")
    with pytest.raises(FileNotFoundError, match="directory empty holds no"):
        expand_shards("empty", "data.train")
    assert normalize_shards("d/x/../x/*.tar") == f"{tmp_path}/d/x/*.tar"
    assert normalize_shards(["d/x", "pipe:cat a.tar"]) == [f"{tmp_path}/d/x", "pipe:cat a.tar"]
    assert normalize_shards(x) == normalize_shards([os.path.abspath(p) for p in x])


def test_relative_and_absolute_shards_are_the_same_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = write_shards(tmp_path / "data", samples=16, shards=2)
    model = train(tiny_config(tmp_path / "model", shards, train={"steps": 1})).output_dir
    options = {"chunk_size": 4, "dtype": "float32", "progress": False}
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(shards, tmp_path)
    assert not Path(relative).is_absolute()
    run_export(str(model), relative, None, tmp_path / "out", **options)
    files = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    run_export(str(model), shards, None, tmp_path / "out", **options)  # the absolute spelling
    again = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert again == files
    assert read_manifest(tmp_path / "out")["settings"]["shards"] == shards
