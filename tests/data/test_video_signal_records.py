"""Bad video and time-series records: eight kinds each are skipped and counted by reason,
none is fatal, and nothing is decoded or loaded past a limit (the headers are checked first:
spies on the frame decoder and on ``np.load`` see only the records within the limits)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
import webdataset as wds

from mmalign.data import make_loader
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.video import EncodedVideo, encode_video
from mmalign.towers import build_tower

VIDEO = {"type": "video", "encoder": "conv3d", "frames": 2, "image_size": 16,
         "conv_channels": [4], "width": 8}  # fmt: skip
SIGNAL = {"type": "timeseries", "channels": 2, "window": 16, "width": 8,
          "resnet_channels": [4]}  # fmt: skip


def write(path: Path, records: list[dict[str, Any]]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def clip(frames: int = 6, size: int = 32) -> bytes:
    return encode_video(np.full((frames, size, size, 3), 90, np.uint8), 6.0)


def no_frames() -> bytes:
    """An MP4 written with a video stream and no frame (FFmpeg leaves the stream out)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width = stream.height = 16
        container.start_encoding()
    assert buffer.tell() > 0
    return buffer.getvalue()


def audio_only() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(800, np.float32), 8000, format="WAV")
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """Only the header of an npy claiming ``shape`` (no data follows)."""
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_bad_videos_are_skipped_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_clip = clip(frames=40)
    records = {
        "good0": clip(),
        "corrupt": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,
        "truncated": long_clip[: len(long_clip) // 3],
        "empty": b"",
        "no-video-stream": audio_only(),
        "zero-frames": no_frames(),
        "huge-frames": clip(size=64),  # 64x64 over max_video_pixels
        "too-many-frames": long_clip,  # 40 frames over max_video_frames
        "too-long": encode_video(np.zeros((30, 16, 16, 3), np.uint8), 1.0),  # 30 s
        "good1": clip(),
    }
    shard = write(tmp_path / "v.tar", [{"__key__": k, "mp4": v} for k, v in records.items()])
    decoded: list[int] = []
    decode_frames = EncodedVideo.decode_frames

    def spy(self: EncodedVideo, indices: Any) -> np.ndarray:
        decoded.append(self.frame_count)
        return decode_frames(self, indices)

    monkeypatch.setattr(EncodedVideo, "decode_frames", spy)
    limits = RecordLimits(
        **{
            **DEFAULT_LIMITS.__dict__,
            "max_video_pixels": 32 * 32,
            "max_video_frames": 30,
            "max_video_seconds": 20.0,
        }
    )
    loader = make_loader(shard, {"video": build_tower(VIDEO)}, {"video": "mp4"}, 4, limits=limits)
    keys = [key for batch in loader for key in batch.keys]
    assert keys == ["good0", "good1"]
    assert loader.counters == {
        "seen": 10,
        "used": 2,
        "skipped/bad_video": 4,
        "skipped/empty_file": 1,
        "skipped/too_large": 1,
        "skipped/too_long": 2,
    }
    assert decoded == [6, 6]  # frames were decoded of the good records only


def test_bad_signals_are_skipped_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(size=(2, 20)).astype(np.float32)
    nan = good.copy()
    nan[0, 5] = np.nan
    infinite = good.copy()
    infinite[1, 3] = np.inf
    records = [
        ("good0", "npy", npy(good)),
        ("nan-samples", "npy", npy(nan)),
        ("wrong-dtype", "npy", npy(np.array([["a", "b"], ["c", "d"]]))),
        ("truncated", "npy", npy(good)[:-40]),
        ("too-many-samples", "npy", npy_header((1, 2 * 10**7))),
        ("too-many-channels", "npy", npy_header((5000, 10))),
        ("over-decoded-bytes", "npy", npy_header((400, 400, 400))),
        ("wrong-channels", "npy", npy(good[:1].repeat(3, 0))),
        ("infinite", "npy", npy(infinite)),
        ("good1", "npy", npy(good[:, :12])),
    ]
    shard = write(tmp_path / "s.tar", [{"__key__": k, e: v} for k, e, v in records])
    loaded: list[tuple[int, ...]] = []
    load = np.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        array = load(*args, **kwargs)
        loaded.append(array.shape)
        return array

    monkeypatch.setattr(np, "load", spy)
    loader = make_loader(shard, {"ts": build_tower(SIGNAL)}, {"ts": "npy"}, 4)
    assert [key for batch in loader for key in batch.keys] == ["good0", "good1"]
    assert loader.counters == {
        "seen": 10,
        "used": 2,
        "skipped/bad_array": 2,
        "skipped/too_long": 1,
        "skipped/too_large": 2,
        "skipped/nonfinite": 2,  # a NaN inside an observed channel, an Inf
        "skipped/bad_channels": 1,  # 3 channels for a 2-channel tower
    }
    assert all(np.prod(shape) <= 60 for shape in loaded)  # no array over a limit was loaded


def test_csv_signals_check_rows_and_columns_before_parsing(tmp_path: Path) -> None:
    tower = build_tower({**SIGNAL, "columns": ["ii", "v1"]})
    good = "ii,v1\n" + "".join(f"{i},{-i}\n" for i in range(20))
    records = [
        ("good", good.encode()),
        ("missing-column", ("ii\n" + "".join(f"{i}\n" for i in range(20))).encode()),
        ("text-cells", b"ii,v1\n1,a\n2,b\n"),
        ("too-many-rows", b"ii,v1\n" + b"1,2\n" * 200),
        ("too-many-columns", (",".join(f"c{i}" for i in range(50)) + "\n").encode()),
        ("empty-cell", b"ii,v1\n1,2\n3,\n"),
    ]
    shard = write(tmp_path / "c.tar", [{"__key__": k, "csv": v} for k, v in records])
    limits = RecordLimits(
        **{**DEFAULT_LIMITS.__dict__, "max_signal_samples": 100, "max_signal_channels": 10}
    )
    loader = make_loader(shard, {"ts": tower}, {"ts": "csv"}, 4, limits=limits)
    batches = list(loader)
    assert [key for batch in batches for key in batch.keys] == ["good", "missing-column"]
    assert batches[0].inputs["ts"][1, 1].isnan().all()  # the absent column: a missing channel
    assert loader.counters == {
        "seen": 6,
        "used": 2,
        "skipped/bad_csv": 1,
        "skipped/too_long": 1,
        "skipped/too_large": 1,
        "skipped/nonfinite": 1,  # the empty cell: NaN inside an observed column
    }
