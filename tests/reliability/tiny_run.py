"""A tiny trained run and its export, made once per test module (the tests of output folders,
links, bad metadata, index parameters and stale shards read them and never change them)."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_config, write_shards

from mmalign.export import run_export
from mmalign.training import train


def trained_run(directory: Path) -> tuple[Path, str]:
    """A two-step run of the tiny tabular + graph model in ``directory/run`` and the pattern
    of its 48-record shards (``directory/shards``)."""
    shards = write_shards(directory / "shards")
    result = train(tiny_config(directory / "run", shards, train={"steps": 2, "save_every": 2}))
    return result.output_dir, shards


def exported(run: Path, shards: str, out: Path, **options: object) -> Path:
    """``run``'s export of ``shards`` into ``out`` (float32, chunks of 16, no progress bar)."""
    settings = {"chunk_size": 16, "dtype": "float32", "progress": False, **options}
    run_export(run, shards, None, out, **settings)
    return out
