"""Files a tower type reads its own way: a video's own audio track as the audio modality of
the same record (``audio: mp4``; equal to the sine it was written with, limits checked from
the track's header before a sample is decoded, no track a counted skip), and an npz read by a
time-series tower (its single array, or ``npz_key``) while a graph tower still reads an npz as
a graph."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from mmalign.data import make_loader
from mmalign.data.decode import decode_value
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.video import encode_video
from mmalign.towers import build_tower

VIDEO = {"type": "video", "encoder": "conv3d", "frames": 2, "image_size": 16,
         "conv_channels": [4], "width": 8}  # fmt: skip
AUDIO = {"type": "audio", "n_mels": 16, "clip_seconds": 0.5}
SIGNAL = {"type": "timeseries", "channels": 2, "window": 16, "width": 8,
          "resnet_channels": [4]}  # fmt: skip


def sine(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def clip(audio: tuple[np.ndarray, int] | None) -> bytes:
    frames = np.full((6, 16, 16, 3), 90, np.uint8)
    return encode_video(frames, 6.0, audio=audio, audio_codec="alac")  # lossless track


def write(path: Path, records: list[dict[str, Any]]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_the_audio_track_decodes_to_the_sine_it_was_written_with() -> None:
    waveform, rate = decode_value("mp4", clip((sine(1.0, 16000), 16000)), kind="audio")
    assert rate == 16000
    np.testing.assert_allclose(waveform, sine(1.0, 16000), atol=1e-6)
    assert decode_value("mp4", clip(None)).frame_count == 6  # a video tower reads the frames


def test_audio_mp4_is_a_modality_of_the_record_and_limits_refuse_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = {
        "good0": clip((sine(1.0, 16000), 16000)),
        "no-track": clip(None),
        "too-long": clip((sine(3.0, 16000), 16000)),  # over max_audio_seconds 2
        "bad-rate": clip((sine(1.0, 8000), 8000)),  # outside audio_sample_rates
        "good1": clip((sine(0.5, 16000), 16000)),
    }
    shard = write(tmp_path / "v.tar", [{"__key__": k, "mp4": v} for k, v in records.items()])
    decoded: list[int] = []
    real = av.AudioResampler

    class Spy:
        def __init__(self, **options: Any) -> None:
            self.inner = real(**options)

        def resample(self, frame: Any) -> Any:
            decoded.append(frame.samples)
            return self.inner.resample(frame)

    monkeypatch.setattr(av, "AudioResampler", Spy)
    limits = RecordLimits(
        **{
            **DEFAULT_LIMITS.__dict__,
            "max_audio_seconds": 2.0,
            "audio_sample_rates": (16000, 48000),
        }
    )
    towers = {"video": build_tower(VIDEO), "audio": build_tower(AUDIO)}
    loader = make_loader(shard, towers, {"video": "mp4", "audio": "mp4"}, 4, limits=limits)
    batches = list(loader)
    assert [key for batch in batches for key in batch.keys] == ["good0", "good1"]
    assert loader.counters == {
        "seen": 5,
        "used": 2,
        "skipped/no_audio_track": 1,
        "skipped/too_long": 1,
        "skipped/bad_sample_rate": 1,
    }
    assert sum(decoded) == 16000 + 8000  # samples were decoded of the good records only
    expected = towers["audio"].collate(
        [towers["audio"].preprocess((sine(s, 16000), 16000)) for s in (1.0, 0.5)]
    )
    torch.testing.assert_close(batches[0].inputs["audio"], expected, atol=1e-5, rtol=1e-5)
    assert batches[0].inputs["video"].shape == (2, 2, 3, 16, 16)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_a_timeseries_tower_reads_an_npz_and_a_graph_tower_still_reads_a_graph(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2, 20)).astype(np.float32)
    graph = {"x": np.ones((3, 2), np.float32), "edge_index": np.array([[0, 1], [1, 2]])}
    assert decode_value("npz", npz(**graph))["x"].shape == (3, 2)  # no tower: a graph
    assert decode_value("npz", npz(**graph), kind="graph")["edge_index"].shape == (2, 2)
    records = [
        ("single", npz(signal=signal)),
        ("named", npz(ecg=signal, labels=np.arange(3))),
        ("too-long", npz(signal=np.zeros((2, 10**6), np.float32))),
        ("text", npz(signal=np.array(["a", "b"]))),
        ("nan", npz(signal=np.where(np.arange(20) == 3, np.nan, signal))),
        ("three-channels", npz(signal=np.zeros((3, 20), np.float32))),
    ]
    shard = write(tmp_path / "s.tar", [{"__key__": k, "npz": v} for k, v in records])
    limits = RecordLimits(**{**DEFAULT_LIMITS.__dict__, "max_signal_samples": 1000})
    towers = {"ts": build_tower(SIGNAL)}
    loader = make_loader(shard, towers, {"ts": "npz"}, 4, limits=limits)
    batch = next(iter(loader))
    assert batch.keys == ["single"]  # two arrays without npz_key: which one is not guessed
    torch.testing.assert_close(batch.inputs["ts"][0], towers["ts"].preprocess(signal))
    assert loader.counters == {
        "seen": 6,
        "used": 1,
        "skipped/preprocess": 1,  # two arrays, no npz_key
        "skipped/too_long": 1,
        "skipped/bad_array": 1,
        "skipped/nonfinite": 1,
        "skipped/bad_channels": 1,
    }
    named = {"ts": build_tower({**SIGNAL, "npz_key": "ecg"})}
    loader = make_loader(shard, named, {"ts": "npz"}, 4, limits=limits)
    batch = next(iter(loader))
    assert batch.keys == ["named"]  # "single" has no array "ecg"
    torch.testing.assert_close(batch.inputs["ts"][0], towers["ts"].preprocess(signal))
