"""Query files of video and time-series modalities, and a video's audio track for an audio
tower (``audio: mp4``), are decoded as their tower reads a record's file: a search query of
an mp4 or an npy gives the embedding of the frames or array it holds, decoded here with PyAV
and numpy directly; the command line lets an mp4 through for an audio modality."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mmalign.cli.search import check_readable, parse_raw
from mmalign.data.video import encode_video
from mmalign.errors import UserError
from mmalign.export.search import QueryError, query_vector
from mmalign.model import AlignmentModel

TOWERS = {
    "clip": {"type": "video", "encoder": "conv3d", "frames": 2, "image_size": 16,
             "conv_channels": [4], "width": 8},
    "ecg": {"type": "timeseries", "channels": 2, "window": 16, "width": 8,
            "resnet_channels": [4]},
    "sound": {"type": "audio", "n_mels": 16, "clip_seconds": 0.5, "width": 16, "heads": 2,
              "layers": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def model() -> AlignmentModel:
    torch.manual_seed(0)
    return AlignmentModel.from_config({"dim": 4, "towers": TOWERS}).eval()


TONE = (0.5 * np.sin(np.arange(8000) * 0.2)).astype(np.float32)
"""The mp4's audio track (ALAC: lossless, decodes to these samples within 1e-6)."""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    paths = {"mp4": tmp_path / "clip.mp4", "npy": tmp_path / "ecg.npy"}
    paths["mp4"].write_bytes(encode_video(frames, 6.0, audio=(TONE, 16000), audio_codec="alac"))
    np.save(paths["npy"], rng.normal(size=(2, 24)).astype(np.float32))
    (tmp_path / "tone.npy").write_bytes(TONE.tobytes())
    return paths


def test_video_and_timeseries_query_files_embed_what_they_hold(
    model: AlignmentModel, files: dict[str, Path]
) -> None:
    with av.open(str(files["mp4"])) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    expected = {
        "clip": model.encode("clip", [frames])[0],
        "ecg": model.encode("ecg", [np.load(files["npy"])])[0],
        "sound": model.encode("sound", [(TONE, 16000)])[0],
    }
    paths = {"clip": files["mp4"], "ecg": files["npy"], "sound": files["mp4"]}
    for modality, path in paths.items():
        found = query_vector(model, {modality: str(path)})
        torch.testing.assert_close(found, expected[modality], atol=1e-5, rtol=1e-5, msg=modality)


def test_a_query_file_the_tower_cannot_read_is_one_error(
    model: AlignmentModel, files: dict[str, Path]
) -> None:
    with pytest.raises(QueryError, match=r"'clip' query .*ecg\.npy is refused \(bad_video\)"):
        query_vector(model, {"clip": str(files["npy"])})
    with pytest.raises(QueryError, match=r"\(bad_array\).*pass a file a timeseries tower reads"):
        query_vector(model, {"ecg": str(files["mp4"])})


def test_the_command_line_passes_an_mp4_to_an_audio_modality(
    model: AlignmentModel, files: dict[str, Path], tmp_path: Path
) -> None:
    check_readable(str(files["mp4"]), "audio", "--audio")  # read by the search: no error
    with pytest.raises(UserError, match=r"tone\.npy is refused \(bad_audio\).*\(--audio\)"):
        check_readable(str(tmp_path / "tone.npy"), "audio", "--audio")
    np.testing.assert_array_equal(parse_raw(model, "ecg", str(files["npy"])), np.load(files["npy"]))
    torch.testing.assert_close(  # decoded once, as the search decodes a path
        query_vector(model, {"sound": parse_raw(model, "sound", str(files["mp4"]))}),
        query_vector(model, {"sound": str(files["mp4"])}),
    )
    with pytest.raises(UserError, match=r"--query clip=\.\.\."):
        parse_raw(model, "clip", str(tmp_path / "missing.mp4"))
