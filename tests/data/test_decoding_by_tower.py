"""The tower type picks how a file is decoded everywhere a file is read, not only in the
training loader: ``data.views`` items (an ``audio: mp4`` modality sampled or expanded reads
each video's audio track; a time series' ``npz`` items are arrays, not graphs),
:func:`iterate_records` with ``kinds``, mined negatives and :func:`decode_file` (query
files). Each decoded value is compared with the sine or array the file was written from."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from mmalign.data import iterate_records, make_loader
from mmalign.data.decode import decode_file, file_extension
from mmalign.data.negatives import negative_items
from mmalign.data.record_error import RecordError
from mmalign.data.video import EncodedVideo, encode_video
from mmalign.towers import build_tower

AUDIO = {"type": "audio", "n_mels": 16, "clip_seconds": 0.5}
SIGNAL = {"type": "timeseries", "channels": 2, "window": 16, "width": 8,
          "resnet_channels": [4]}  # fmt: skip


def sine(hertz: float, rate: int = 16000, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)


def clip_with_track(hertz: float) -> bytes:
    """A 6-frame mp4 whose lossless (ALAC) audio track is a sine of ``hertz``."""
    frames = np.full((6, 16, 16, 3), 90, np.uint8)
    return encode_video(frames, 6.0, audio=(sine(hertz), 16000), audio_codec="alac")


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write(path: Path, records: list[dict[str, Any]]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def signals(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, 16)).astype(np.float32) for _ in range(count)]


def test_expanded_views_of_audio_mp4_are_the_audio_tracks(tmp_path: Path) -> None:
    """Before, a view item was decoded without its tower's type: every mp4 became a video,
    which the audio tower refused (every record ``skipped/preprocess``)."""
    records = [
        {"__key__": "a", "mp4": clip_with_track(440), "1.mp4": clip_with_track(660)},
        {"__key__": "b", "mp4": clip_with_track(880)},
    ]
    shard = write(tmp_path / "v.tar", records)
    tower = build_tower(AUDIO)
    loader = make_loader(shard, {"sound": tower}, {"sound": "mp4"}, 4, views={"sound": "expand"})
    (batch,) = list(loader)
    assert batch.keys == ["a", "a", "b"]
    expected = tower.collate([tower.preprocess((sine(hz), 16000)) for hz in (440, 660, 880)])
    torch.testing.assert_close(batch.inputs["sound"], expected, atol=1e-5, rtol=1e-5)
    assert loader.counters == {"seen": 2, "used": 2}


def test_sampled_views_of_timeseries_npz_are_arrays(tmp_path: Path) -> None:
    """Before, an ``npz`` view item was read as a graph (``skipped/bad_graph``)."""
    first, second = signals(2)
    records = [{"__key__": "r", "npz": npz(signal=first), "1.npz": npz(signal=second)}]
    shard = write(tmp_path / "s.tar", records)
    tower = build_tower(SIGNAL)
    seen = []
    for seed in range(6):  # the sampled item varies with the seed; each is one of the two
        loader = make_loader(
            shard, {"ts": tower}, {"ts": "npz"}, 2, views={"ts": "sample"}, seed=seed
        )
        (batch,) = list(loader)
        row = batch.inputs["ts"][0]
        matches = [torch.equal(row, tower.preprocess(item)) for item in (first, second)]
        assert sum(matches) == 1
        seen.append(matches.index(True))
    assert set(seen) == {0, 1}


def test_iterate_records_decodes_by_the_kinds_given(tmp_path: Path) -> None:
    (signal,) = signals(1)
    shard = write(
        tmp_path / "r.tar",
        [{"__key__": "k", "mp4": clip_with_track(440), "npz": npz(ecg=signal), "cls": b"3"}],
    )
    fields = {"sound": "mp4", "ecg": "npz", "label": "cls"}
    (plain,) = list(iterate_records(shard, {"video": "mp4", "label": "cls"}))
    assert isinstance(plain["video"], EncodedVideo) and plain["label"] == 3
    (record,) = list(iterate_records(shard, fields, kinds={"sound": "audio", "ecg": "timeseries"}))
    waveform, rate = record["sound"]
    assert rate == 16000
    np.testing.assert_allclose(waveform, sine(440), atol=1e-6)
    np.testing.assert_array_equal(record["ecg"]["ecg"], signal)
    assert list(iterate_records(shard, {"ecg": "npz"})) == []  # read as a graph: skipped


def test_decode_file_uses_the_tower_types_decoder(tmp_path: Path) -> None:
    (signal,) = signals(1)
    paths = {
        "clip.mp4": clip_with_track(440),
        "ecg.npy": npz(ecg=signal),  # an npz misnamed .npy: decoded by its name, refused
        "ecg.npz": npz(ecg=signal),
        "lead.csv": b"ii,v1\n1,2\n3,4\n",
    }
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    assert decode_file(tmp_path / "clip.mp4", "video").frame_count == 6
    waveform, rate = decode_file(tmp_path / "clip.mp4", "audio")
    assert rate == 16000
    np.testing.assert_allclose(waveform, sine(440), atol=1e-6)
    np.testing.assert_array_equal(decode_file(tmp_path / "ecg.npz", "timeseries")["ecg"], signal)
    np.testing.assert_array_equal(
        decode_file(tmp_path / "lead.csv", "timeseries")["v1"], np.array([2.0, 4.0], np.float32)
    )
    with pytest.raises(RecordError, match=r"^bad_array: "):
        decode_file(tmp_path / "ecg.npy", "timeseries")
    assert [file_extension("x.flac", "audio"), file_extension("x.bin", "video")] == ["flac", "mp4"]


def test_mined_negatives_are_decoded_by_the_kind_given() -> None:
    first, second = signals(2)
    raw = {"__key__": "k", "__url__": "s.tar", "neg1.npz": npz(x=second), "neg0.npz": npz(x=first)}
    found = negative_items(raw, ("npz",), kind="timeseries")
    assert [name for name, _, _ in found] == ["neg0", "neg1"]
    for (_, value, _), expected in zip(found, (first, second), strict=True):
        np.testing.assert_array_equal(value["x"], expected)
    with pytest.raises(RecordError, match=r"^bad_graph: "):  # no kind: an npz is a graph
        negative_items(raw, ("npz",))


@pytest.mark.parametrize("kind", ["timeseries", "graph", "image"])
def test_a_query_that_is_not_a_regular_file_is_refused_unread(kind: str) -> None:
    """``/dev/zero`` has size 0 to ``stat`` and no end: it is refused before any read (it
    was read until the memory ran out)."""
    with pytest.raises(RecordError) as caught:
        decode_file("/dev/zero", kind)
    assert caught.value.reason == "not_a_file"


def test_a_query_file_is_read_no_further_than_the_member_limit(tmp_path: Path) -> None:
    import dataclasses

    from mmalign.data.limits import DEFAULT_LIMITS

    path = tmp_path / "big.npy"
    path.write_bytes(b"\0" * 2048)
    limits = dataclasses.replace(DEFAULT_LIMITS, max_member_bytes=1024)
    with pytest.raises(RecordError) as caught:
        decode_file(path, "timeseries", limits)
    assert caught.value.reason == "member_too_large"
