"""A resampled stream with no usable record ends in an error naming the shards and the
counters (exit status 2 from the CLI) instead of spinning forever; a stream that can yield,
however rarely, never stops."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import good_record, tiny_config, write_config, write_shard, write_shards

from mmalign.cli.main import main
from mmalign.data import NoUsableData, make_loader
from mmalign.towers import build_tower

LIMIT_S = 120


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (instead of hanging) when a test runs past ``LIMIT_S`` seconds."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"still running after {LIMIT_S} s: the stream hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def towers(tmp_path: Path) -> dict[str, Any]:
    model = tiny_config(tmp_path, "")["model"]["towers"]
    return {name: build_tower(config) for name, config in model.items()}


def run_cli(config: Path, *overrides: str) -> int:
    arguments = ["train", str(config)]
    for override in overrides:
        arguments += ["--set", override]
    return main(arguments)


@pytest.mark.usefixtures("alarm")
def test_cli_stops_on_a_non_tar_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    not_tar = tmp_path / "nottar.tar"
    not_tar.write_text("not a tar archive\n" * 20)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(not_tar)))
    status = run_cli(config, "data.resampled=true", f"data.train={not_tar}")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert error.startswith("mmalign: error: cannot train on data.train: no record of the 1 ")
    assert str(not_tar) in error and "skipped/unreadable_shard" in error
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipping record '<shard>' in shard {not_tar} (unreadable_shard)" in log


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.usefixtures("alarm")
def test_cli_stops_on_a_fields_typo(
    tmp_path: Path, capsys: pytest.CaptureFixture, resampled: bool
) -> None:
    shards = write_shards(tmp_path / "shards", samples=24)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", shards))
    status = run_cli(
        config, f"data.resampled={resampled}", "data.fields.labs=npz", "train.steps=1000"
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert "no usable record of the 3 shards has data.fields.labs: npz" in error
    assert "train-000000.tar" in error
    if resampled:  # the survey saw the records' files, within a bounded number of passes
        assert "(extensions in the records: cls, graph.json, npy)" in error
        assert "records seen" in error
    else:  # one whole epoch
        assert "records seen 24, used 24" in error


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.launches)])
@pytest.mark.usefixtures("alarm")
def test_all_records_bad_or_empty_shards_end_the_stream(tmp_path: Path, workers: int) -> None:
    bad = [{**good_record(i), "graph.json": b"{broken", "npy": b""} for i in range(5)]
    write_shard(tmp_path / "s" / "bad.tar", bad)
    write_shard(tmp_path / "s" / "empty.tar", [])
    loader = make_loader(
        str(tmp_path / "s"),
        towers(tmp_path),
        {"labs": "npy", "graph": "graph.json"},
        batch_size=2,
        resampled=True,
        shuffle_buffer=4,
        workers=workers,
        field="data.train",
    )
    with pytest.raises(NoUsableData, match="no record of the 2 shards is usable") as error:
        next(iter(loader))
    assert "skipped/empty_file" in str(error.value) and "empty.tar" in str(error.value)
    assert loader.counters["seen"] <= 5 * 20 * max(workers, 1)  # a bounded number of passes


@pytest.mark.usefixtures("alarm")
def test_one_usable_record_keeps_a_resampled_stream_going(tmp_path: Path) -> None:
    bad = [{**good_record(i), "npy": b""} for i in range(6)]
    write_shard(tmp_path / "s" / "a.tar", bad)
    write_shard(tmp_path / "s" / "b.tar", [*bad[:5], good_record(99)])  # usable: the last one
    loader = make_loader(
        str(tmp_path / "s"),
        towers(tmp_path),
        {"labs": "npy", "graph": "graph.json"},
        batch_size=2,
        resampled=True,
        shuffle_buffer=3,
    )
    stream = iter(loader)
    keys = {key for _ in range(20) for key in next(stream).keys}
    assert keys == {"sample00099"}
