"""One record cannot take a run down or eat its memory: per-record limits are checked from
headers before the work is done, and any failure of one record skips and counts it, logged
with its shard and key in ``train.log``."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from conftest import good_record, tiny_config, write_shard

from mmalign.config import ConfigError, TowerConfig, load_config
from mmalign.data import make_loader
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.towers import Tower, build_tower
from mmalign.training import train

AUDIO = {"type": "audio", "clip_seconds": 0.25, "n_mels": 16, "width": 16, "heads": 2, "layers": 1}
MIB = 2**20


def wav_claiming(rate: int) -> bytes:
    """A 1.6 KB 16-bit WAV of 800 samples whose header claims ``rate`` Hz (patched bytes)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(800, np.float32), 8000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    assert data[24:28] == struct.pack("<I", 8000)  # fmt chunk: sample rate, then byte rate
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", min(rate * 2, 2**32 - 1))
    return bytes(data)


def silent_flac(seconds: float, rate: int = 48000) -> bytes:
    """A FLAC of silence: a few KB per minute that decodes to 4 bytes per sample."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, 1, format="FLAC") as flac:
        for _ in range(int(seconds)):
            flac.write(np.zeros(rate, np.float32))
    return buffer.getvalue()


def tone_wav(rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    clip = np.sin(np.arange(rate // 4) * 0.05).astype(np.float32) * 0.3
    soundfile.write(buffer, clip, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _octal(number: int, width: int) -> bytes:
    return b"%0*o" % (width - 1, number) + b"\0"


def sparse_member(name: str, stored: bytes, expanded: int) -> bytes:
    """A GNU-sparse tar member (old GNU format, type ``S``) storing ``stored`` and claiming
    ``expanded`` bytes: tarfile reads it as ``expanded`` bytes, holes filled with zeros."""
    info = tarfile.TarInfo(name)
    info.size = len(stored)
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = _octal(0, 12)  # one sparse entry: offset 0 ...
    header[398:410] = _octal(len(stored), 12)  # ... holding the stored bytes
    header[483:495] = _octal(expanded, 12)  # realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + stored + b"\0" * (-len(stored) % 512)


def shard_with_sparse_member(path: Path, expanded: int) -> Path:
    """A tar of good records around one record whose ``.npy`` is a sparse member."""
    write_shard(path.with_suffix(".good.tar"), [good_record(i) for i in range(4)])
    good = path.with_suffix(".good.tar").read_bytes()
    with tarfile.open(path.with_suffix(".good.tar")) as archive:
        third = archive.getmembers()[6]  # records of 3 files: members 6.. are sample00002
    head, tail = good[: third.offset], good[third.offset :]
    bad = sparse_member("sparse.npy", b"\x93NUMPY" + b"\0" * 500, expanded)
    bad += sparse_member("sparse.graph.json", b"{}", 1024)  # small: read, record still skipped
    path.write_bytes(head + bad + tail)
    path.with_suffix(".good.tar").unlink()
    return path


class FailingTower(Tower):
    """Tabular-like items; ``preprocess`` raises a non-ValueError for the vector of index 3."""

    width = 1

    def __init__(self) -> None:
        super().__init__(TowerConfig(type="failing"))

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        if np.allclose(raw, good_record(3)["npy"]):
            raise IndexError("a bug in a tower")
        return raw

    def collate(self, items: list[Any]) -> Any:
        return np.stack(items)


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``soundfile.read`` to record the size of each clip it decodes."""
    decoded: list[int] = []
    read = soundfile.read

    def spy(*args: Any, **kwargs: Any) -> Any:
        waveform, rate = read(*args, **kwargs)
        decoded.append(waveform.nbytes)
        return waveform, rate

    monkeypatch.setattr(soundfile, "read", spy)
    return decoded


def test_audio_headers_over_the_limits_are_skipped_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flac = silent_flac(120)  # 2 minutes at 48 kHz: 23 MB as float32
    assert soundfile.info(io.BytesIO(flac)).frames * 4 > 20 * len(flac)
    records = [
        {"__key__": "good0", "wav": tone_wav()},
        {"__key__": "rate-2147483647", "wav": wav_claiming(2147483647)},
        {"__key__": "rate-1000003", "wav": wav_claiming(1000003)},
        {"__key__": "long-flac", "flac": flac},
        {"__key__": "good1", "wav": tone_wav(44100)},
    ]
    shard = write_shard(tmp_path / "audio.tar", records)
    decoded = counting_reads(monkeypatch)
    limits = RecordLimits(
        **{**DEFAULT_LIMITS.__dict__, "max_decoded_bytes": 16 * MIB, "max_audio_seconds": 600.0}
    )
    loader = make_loader(
        str(shard), {"audio": build_tower(AUDIO)}, {"audio": "wav;flac"}, 8, limits=limits
    )
    assert [key for batch in loader for key in batch.keys] == ["good0", "good1"]
    assert loader.counters == {
        "seen": 5,
        "used": 2,
        "skipped/bad_sample_rate": 2,
        "skipped/too_large": 1,
    }
    assert len(decoded) == 2 and max(decoded) < MIB  # only the good clips were decoded

    shorter = RecordLimits(**{**limits.__dict__, "max_audio_seconds": 60.0})
    loader = make_loader(str(shard), {"audio": build_tower(AUDIO)}, {"audio": "wav;flac"}, 8,
                         limits=shorter)  # fmt: skip
    list(loader)
    assert loader.counters["skipped/too_long"] == 1


def test_a_wrong_rate_past_wide_limits_fails_in_the_tower_without_the_memory(
    tmp_path: Path,
) -> None:
    records = [{"__key__": f"rate-{r}", "wav": wav_claiming(r)} for r in (2147483647, 1000003)]
    shard = write_shard(tmp_path / "audio.tar", [*records, {"__key__": "good", "wav": tone_wav()}])
    wide = RecordLimits(**{**DEFAULT_LIMITS.__dict__, "audio_sample_rates": (1, 2**31 - 1)})
    tracemalloc.start()
    loader = make_loader(str(shard), {"audio": build_tower(AUDIO)}, {"audio": "wav"}, 8,
                         limits=wide)  # fmt: skip
    keys = [key for batch in loader for key in batch.keys]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["good"]
    assert loader.counters["skipped/preprocess"] == 2  # the resampling filter is refused
    assert peak < 50 * MIB  # 1,000,003 Hz alone used to cost 0.9 GB, 2147483647 Hz 320 GiB


def test_sparse_and_oversized_tar_members_are_not_read(tmp_path: Path) -> None:
    shard = shard_with_sparse_member(tmp_path / "sparse.tar", expanded=512 * MIB)
    assert shard.stat().st_size < 64 * 1024
    with tarfile.open(shard) as archive:  # what a plain reader would do
        sizes = {member.name: member.size for member in archive.getmembers()}
    assert sizes["sparse.npy"] == 512 * MIB
    model = tiny_config(tmp_path, "")["model"]["towers"]
    towers = {name: build_tower(config) for name, config in model.items()}
    fields = {"labs": "npy", "graph": "graph.json"}
    tracemalloc.start()
    loader = make_loader(str(shard), towers, fields, batch_size=8)
    keys = [key for batch in loader for key in batch.keys]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["sample00000", "sample00001", "sample00002", "sample00003"]
    assert loader.counters == {"seen": 5, "used": 4, "skipped/member_too_large": 1}
    assert peak < 20 * MIB

    big = write_shard(
        tmp_path / "big.tar",
        [good_record(0), {**good_record(1), "npy": np.zeros(300_000, np.float32)}, good_record(2)],
    )
    small = RecordLimits(**{**DEFAULT_LIMITS.__dict__, "max_member_bytes": MIB})
    loader = make_loader(str(big), towers, fields, batch_size=8, limits=small)
    assert [key for batch in loader for key in batch.keys] == ["sample00000", "sample00002"]
    assert loader.counters["skipped/member_too_large"] == 1


def test_any_exception_of_a_tower_skips_only_its_record(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "a.tar", [good_record(i) for i in range(6)])
    loader = make_loader(str(shard), {"labs": FailingTower()}, {"labs": "npy"}, batch_size=2)
    keys = [key for batch in loader for key in batch.keys]
    assert keys == ["sample00000", "sample00001", "sample00002", "sample00004", "sample00005"]
    assert loader.counters == {"seen": 6, "used": 5, "skipped/preprocess": 1}


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.launches)])
def test_train_log_names_each_skipped_record(tmp_path: Path, workers: int) -> None:
    shards = tmp_path / "shards"
    shard_with_sparse_member(shards / "a.tar", expanded=512 * MIB)
    write_shard(shards / "b.tar", [good_record(i) for i in range(10, 20)])
    config = tiny_config(
        tmp_path / "run",
        str(shards),
        data={"workers": workers, "batch_size": 4},
        train={"steps": 4, "save_every": 0},
    )
    train(config)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipping record 'sparse' in shard {shards / 'a.tar'} (member_too_large)" in log
    assert "sparse.npy is 512.0 MiB (GNU sparse: its expanded size)" in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records[-1]["data/skipped/member_too_large"] >= 1


def test_limits_are_config_fields_checked_at_load() -> None:
    towers = {"labs": {"type": "tabular", "in_features": 2}}
    config = load_config(
        {"model": {"towers": towers}},
        ["data.max_member_bytes=1024", "data.audio_sample_rates=[8000, 48000]"],
    )
    limits = RecordLimits.from_config(config.data)
    assert (limits.max_member_bytes, limits.audio_sample_rates) == (1024, (8000, 48000))
    for override, field in [
        ("data.audio_sample_rates=[48000, 8000]", "data.audio_sample_rates"),
        ("data.audio_sample_rates=[0, 8000]", "data.audio_sample_rates"),
        ("data.max_decoded_bytes=0", "data.max_decoded_bytes"),
        ("data.max_audio_seconds=-1", "data.max_audio_seconds"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config({"model": {"towers": towers}}, [override])
