"""Bad records are skipped with a counted reason and the totals add up
(``seen = used + skipped/* + dropped/*``), in the loader's counters and in the training log."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from conftest import good_record, tiny_config, write_shard
from PIL import Image

from mmalign.data import make_loader
from mmalign.towers import build_tower
from mmalign.training import train

VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
AUDIO = {"type": "audio", "clip_seconds": 0.25, "n_mels": 16, "width": 16, "heads": 2, "layers": 1}


def add_up(counters: dict[str, int]) -> int:
    """used + every skipped/* and dropped/* count."""
    return counters["used"] + sum(
        value for key, value in counters.items() if key.startswith(("skipped/", "dropped/"))
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(waveform: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def tone(rate: int, seconds: float = 0.3) -> np.ndarray:
    return np.sin(np.arange(int(rate * seconds)) * 0.05).astype(np.float32) * 0.3


def truncated_shard(path: Path, records: list[dict[str, Any]]) -> Path:
    """A shard whose last file is cut in the middle (a copy interrupted by a crash)."""
    write_shard(path, records)
    with tarfile.open(path) as archive:
        last = archive.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    return path


def image_audio_records() -> list[dict[str, Any]]:
    nan_clip = tone(16000)
    nan_clip[100] = np.nan
    good = {"png": png(20, 20), "wav": wav(tone(16000), 16000)}
    return [
        {"__key__": "good0", **good},
        {"__key__": "good1", **good},
        {"__key__": "resampled44k", "png": png(20, 20), "wav": wav(tone(44100), 44100)},
        {"__key__": "zero-by-zero", "png": png_header(0, 0), "wav": good["wav"]},
        {"__key__": "bomb-header", "png": png_header(30000, 30000), "wav": good["wav"]},
        {"__key__": "over-limit", "png": png(40, 40), "wav": good["wav"]},
        {"__key__": "not-an-image", "png": b"GIF? no, just text", "wav": good["wav"]},
        {"__key__": "nan-audio", "png": good["png"], "wav": wav(nan_clip, 16000)},
        {"__key__": "cut-wav-header", "png": good["png"], "wav": wav(tone(8000), 8000)[:24]},
        {"__key__": "rate-100hz", "png": good["png"], "wav": wav(tone(100, 2.0), 100)},
        {"__key__": "empty-image", "png": b"", "wav": good["wav"]},
        {"__key__": "17-channels", "png": good["png"], "wav": wav(np.zeros((800, 17)), 16000)},
        {"__key__": "wrong-extensions", "jpeg": good["png"], "mp3": good["wav"]},
    ]


def test_bad_images_and_audio_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 is over, 20 x 20 is not
    shard = write_shard(tmp_path / "media.tar", image_audio_records())
    towers = {
        "image": build_tower({"type": "image", "embed_dim": 8, "vision_cfg": VISION}),
        "audio": build_tower(AUDIO),
    }
    loader = make_loader(str(shard), towers, {"image": "png", "audio": "wav"}, batch_size=2)
    keys = [key for batch in loader for key in batch.keys]
    assert keys == ["good0", "good1", "resampled44k"]
    counters = loader.counters
    assert counters["seen"] == 13 and counters["used"] == 3
    assert counters["skipped/bad_image"] == 2  # 0x0, junk
    assert counters["skipped/too_large"] == 2  # bomb header, over the pixel limit
    assert counters["skipped/nonfinite"] == 1  # NaN waveform
    assert counters["skipped/bad_channels"] == 1  # 17 channels: a transposed waveform
    assert counters["skipped/bad_sample_rate"] == 1  # 100 Hz: under data.audio_sample_rates
    assert counters["skipped/bad_audio"] == 1  # a wav cut inside its header
    assert counters["skipped/empty_file"] == 1
    assert counters["dropped/no_modality"] == 1  # .jpeg/.mp3 are not the configured fields
    assert add_up(counters) == counters["seen"]


def bad_tabular_graph_records() -> list[dict[str, Any]]:
    good = good_record(900)
    return [
        {**good_record(901), "__key__": "zero-byte", "npy": b""},
        {
            **good,
            "__key__": "edge-out-of-range",
            "graph.json": json.dumps({"x": [[0.0, 1.0]], "edge_index": [[0], [5]]}).encode(),
        },
        {**good, "__key__": "json-not-object", "graph.json": b"[1, 2, 3]"},
        {**good, "__key__": "json-broken", "graph.json": b'{"x": [[0'},
        {**good, "__key__": "inf-vector", "npy": np.array([1.0, np.inf, 0, 0, 0, 0])},
        {**good, "__key__": "short-vector", "npy": np.zeros(3, np.float32)},
        {"__key__": "wrong-extensions", "npz": b"not configured", "txt": b"neither"},
    ]


PER_EPOCH = {
    "skipped/empty_file": 1,
    "skipped/bad_graph": 2,  # an edge index out of range, JSON that is not an object
    "skipped/bad_json": 1,
    "skipped/nonfinite": 1,  # the tabular tower rejects Inf
    "skipped/preprocess": 1,  # and a vector of the wrong length
    "skipped/truncated_tar": 1,
    "dropped/no_modality": 1,
}


def test_loader_and_training_log_counts_add_up(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shard(shards / "a.tar", [good_record(i) for i in range(20)] + bad_tabular_graph_records())
    truncated_shard(shards / "b.tar", [good_record(i) for i in range(20, 30)])  # 9 whole records
    config = tiny_config(tmp_path / "run", str(shards), train={"steps": 8, "save_every": 0})
    model_towers = {name: build_tower(tower) for name, tower in config["model"]["towers"].items()}
    loader = make_loader(str(shards), model_towers, config["data"]["fields"], batch_size=8)
    assert sum(len(batch.keys) for batch in loader) == 29
    assert loader.counters == {"seen": 37, "used": 29, **PER_EPOCH}

    train(config)
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    for record in records:
        data = {k.removeprefix("data/"): v for k, v in record.items() if k.startswith("data/")}
        assert add_up(data) == data["seen"], record
    last = {k.removeprefix("data/"): v for k, v in records[-1].items() if k.startswith("data/")}
    assert last["used"] == 8 * 8  # 8 steps of 8 samples, nothing else used
    epochs = records[-1]["train/epoch"] + 1  # the last one may be partly read
    for reason, count in PER_EPOCH.items():
        assert (epochs - 1) * count <= last.get(reason, 0) <= epochs * count, (reason, last)
    assert last["dropped/last_batch"] == 5 * (epochs - 1)  # 29 = 3 x 8 + 5 per full epoch
