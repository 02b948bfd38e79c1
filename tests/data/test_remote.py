"""Shards over HTTP from a loopback server started here: the same keys as on disk, and a
run that survives servers that drop, stall or fail (bounded in time, faults counted)."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from mmalign.data import NoUsableData
from mmalign.data.limits import DEFAULT_LIMITS
from mmalign.data.records import read_shard
from mmalign.data.remote import NetworkPolicy
from mmalign.training import train
from mmalign.training.sample_keys import read_sample_keys
from tests.train_support import metrics, tiny_config, write_shards

STALL_SECONDS = 5.0
"""How long the stalling server holds a connection open without sending (then it closes)."""


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves the files of ``root``; ``faults`` maps a file name to ``drop`` (half the
    bytes, then close), ``drop-once`` (that, on the first request only), ``stall`` (half,
    then nothing for STALL_SECONDS) or an HTTP status to answer instead."""

    daemon_threads = True

    def __init__(self, root: Path, faults: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), ShardHandler)
        self.root, self.faults = root, faults
        self.requests: Counter[str] = Counter()
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ShardHandler(http.server.BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests[name] += 1
        fault = self.server.faults.get(name, "")
        if fault.isdigit():
            self.send_error(int(fault))
            return
        data = (self.server.root / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "drop" or (fault == "drop-once" and self.server.requests[name] == 1):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "stall":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.server.stop.wait(STALL_SECONDS)
            return
        self.wfile.write(data)


@contextmanager
def serving(root: Path, faults: dict[str, str] | None = None) -> Iterator[ShardServer]:
    server = ShardServer(root, faults or {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("served")
    write_shards(directory, "train", shards=5, per_shard=40, seed=3)
    return directory


FAST_FAILING = {"read_timeout": 0.5, "retries": 2, "retry_backoff": 0.05}


def _keys(out: Path) -> list[list[str]]:
    return [record["keys"] for record in read_sample_keys(out)[0]]


def test_shards_over_http_train_on_the_same_keys_as_on_disk(
    tmp_path: Path, shard_dir: Path
) -> None:
    sections = {
        "data": {"shuffle_buffer": 16, "batch_size": 8},
        "train": {"steps": 20, "log_sample_keys": True},
    }
    pattern = "train-{000000..000003}.tar"
    local = tiny_config(tmp_path / "local", str(shard_dir / pattern), **sections)
    train(local)
    with serving(shard_dir, {"train-000001.tar": "drop-once"}) as server:
        remote = tiny_config(tmp_path / "remote", f"{server.url}/{pattern}", **sections)
        remote["data"].update(FAST_FAILING)
        train(remote)
    assert len(_keys(tmp_path / "local")) == 20
    assert _keys(tmp_path / "remote") == _keys(tmp_path / "local")
    # the dropped shard was read again and its first records were not given twice
    last = metrics(tmp_path / "remote")[-1]
    assert last["data/faults/retried"] >= 1 and "data/skipped/truncated_tar" not in last


def test_failing_servers_cost_bounded_time_and_are_counted_with_their_urls(
    tmp_path: Path, shard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = {
        "train-000000.tar": "404",
        "train-000001.tar": "500",
        "train-000002.tar": "drop",
        "train-000003.tar": "stall",
    }  # and train-000004.tar is served whole
    with serving(shard_dir, faults) as server:
        urls = [f"{server.url}/train-{index:06d}.tar" for index in range(5)]
        config = tiny_config(
            tmp_path / "run",
            urls,  # type: ignore[arg-type]
            data={"batch_size": 4, **FAST_FAILING},
            train={"steps": 12},  # 48 records: 20 + 20 before the faults, 8 of the last
        )
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="mmalign.data"):
            result = train(config)
        elapsed = time.monotonic() - started
        requests = dict(server.requests)
    # 3 attempts per failing shard: stalls cost 3 x read_timeout, the rest at most backoffs
    assert elapsed < 15, elapsed
    assert result.steps == 12  # the records before the drop and the stall trained the run
    assert requests == {
        "train-000000.tar": 1,  # 404: not retried
        "train-000001.tar": 3,
        "train-000002.tar": 3,
        "train-000003.tar": 3,
        "train-000004.tar": 1,
    }
    last = metrics(tmp_path / "run")[-1]
    assert last["data/faults/gave_up"] == 4
    assert last["data/faults/retried"] == 6
    assert last["data/skipped/unreachable_shard"] == 2
    assert last["data/skipped/truncated_tar"] == 2
    logged = caplog.text
    for url in urls[:4]:
        assert f"reading shard {url} failed" in logged
    assert "HTTP Error 404" in logged and "HTTP Error 500" in logged and "timed out" in logged


def test_nothing_left_to_read_stops_with_one_message(tmp_path: Path, shard_dir: Path) -> None:
    with serving(shard_dir, {"train-000000.tar": "500", "train-000001.tar": "404"}) as server:
        urls = [f"{server.url}/train-00000{i}.tar" for i in range(2)]
        config = tiny_config(tmp_path / "run", urls, data=FAST_FAILING)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(NoUsableData) as error:
            train(config)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message and "unreachable_shard 2" in message
    assert urls[0] in message


@pytest.mark.launches  # the pipe: commands
def test_pipe_commands_read_like_files_and_failing_ones_are_retried_then_skipped(
    tmp_path: Path, shard_dir: Path
) -> None:
    limits = replace(DEFAULT_LIMITS, network=NetworkPolicy(1.0, retries=1, retry_backoff=0.01))
    shard = shard_dir / "train-000000.tar"
    piped = [record["__key__"] for record in read_shard(f"pipe:cat {shard}", limits)]
    assert piped == [record["__key__"] for record in read_shard(str(shard))]
    url = f"pipe:cat {tmp_path}/missing.tar"
    (marker,) = list(read_shard(url, limits))
    assert marker["__error__"][0] == "unreachable_shard" and marker["__url__"] == url
