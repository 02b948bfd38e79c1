"""Query files of ``search`` pass the per-record limits, from their size and header, before
anything is decoded: an hour of FLAC (180 KB) and a PNG whose header claims 144 megapixels
are refused with one line naming the query, as are JPEG, GIF and BMP headers over twice
Pillow's pixel limit (where Pillow itself refuses to open them), and a small query file still
searches."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmalign.cli.main import main
from mmalign.cli.search import parse_raw
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.errors import UserError
from mmalign.export.search import QueryError, query_vector
from mmalign.model import AlignmentModel

AUDIO = {"type": "audio", "clip_seconds": 0.25, "n_mels": 16, "width": 16, "heads": 2, "layers": 1}
VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}


@pytest.fixture(scope="module")
def model() -> AlignmentModel:
    towers = {"sound": AUDIO, "photo": {"type": "image", "embed_dim": 8, "vision_cfg": VISION}}
    return AlignmentModel.from_config({"dim": 4, "towers": towers}).eval()


def png_claiming(width: int, height: int) -> bytes:
    """A 4x4 PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def patched(image_format: str, offset: int, layout: str, width: int, height: int) -> bytes:
    """An 8x8 image of ``image_format`` whose header claims ``width`` x ``height`` (packed as
    ``layout`` at ``offset``)."""
    buffer = io.BytesIO()
    Image.new("P" if image_format == "GIF" else "RGB", (8, 8)).save(buffer, format=image_format)
    data = bytearray(buffer.getvalue())
    if image_format == "JPEG":
        offset += data.find(b"\xff\xc0")  # the SOF0 segment
    data[offset : offset + struct.calcsize(layout)] = struct.pack(layout, width, height)
    return bytes(data)


BOMBS = {
    "big.png": lambda: png_claiming(12_000, 12_000),  # 1x to 2x the limit: Pillow only warns
    "big.jpg": lambda: patched("JPEG", 5, ">HH", 60_000, 60_000),
    "big.gif": lambda: patched("GIF", 6, "<HH", 65_535, 65_535),
    "big.bmp": lambda: patched("BMP", 18, "<ii", 30_000, 30_000),
}
"""Image files whose header claims more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``."""


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_decompression_bomb_query_is_one_line(
    name: str,
    tmp_path: Path,
    model: AlignmentModel,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    """Over twice the limit Pillow raised its own error (a traceback of ``search``); between
    1x and 2x it warned (a warning line before the error): now one line, ``too_large``."""
    path = tmp_path / name
    path.write_bytes(BOMBS[name]())
    assert main(["search", str(tmp_path), "--image", str(path)]) == 2  # before the index
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1, error
    assert error[0].startswith(f"mmalign: error: the 'image' query {path} is refused (too_large)")
    assert error[0].endswith(
        "(--image); pass a smaller file (the limits of records apply to queries)"
    )
    with pytest.raises(QueryError, match=r"is refused \(too_large\).*MAX_IMAGE_PIXELS"):
        query_vector(model, {"photo": str(path)})
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_every_refused_query_file_names_its_flag(tmp_path: Path) -> None:
    """A graph (or video, time-series) query file was only checked to exist on the command
    line, and refused later by the search without naming ``--query``: now every file query
    is decoded once, within the limits, by the command line, and a refusal names it."""
    graph = {"type": "graph", "in_features": 2, "hidden": 8, "layers": 1}
    model = AlignmentModel.from_config({"dim": 4, "towers": {"graph": graph}}).eval()
    deep = tmp_path / "deep.graph.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError) as refused:
        parse_raw(model, "graph", str(deep))
    assert str(refused.value).startswith(f"the 'graph' query {deep} is refused (bad_graph)")
    assert str(refused.value).endswith(
        "(--query graph=...); pass a file a graph tower reads (.graph.json ...)"
    )
    good = tmp_path / "ring.graph.json"
    good.write_text('{"x": [[0, 1], [1, 0]], "edge_index": [[0, 1], [1, 0]]}')
    assert parse_raw(model, "graph", str(good))["x"].tolist() == [[0, 1], [1, 0]]


def silent_flac(seconds: int, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, 1, format="FLAC") as flac:
        for _ in range(seconds // 60):
            flac.write(np.zeros(60 * rate, np.float32))
    return buffer.getvalue()


def test_oversized_query_files_are_refused_before_decoding(
    tmp_path: Path, model: AlignmentModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    hour, big, wide = tmp_path / "hour.flac", tmp_path / "big.png", tmp_path / "wide.png"
    hour.write_bytes(silent_flac(3600))
    big.write_bytes(png_claiming(12_000, 12_000))  # 144 megapixels: a decompression bomb
    wide.write_bytes(png_claiming(8_000, 8_000))  # 192 MB as RGB: over max_decoded_bytes
    decoded: list[Any] = []
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: decoded.append(a))
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    assert hour.stat().st_size < 250_000
    with pytest.raises(QueryError, match=r"the 'sound' query .*hour\.flac is refused \(too_long\)"):
        query_vector(model, {"sound": str(hour)})
    with pytest.raises(QueryError, match=r"the .photo. query .*big\.png is refused \(too_large\)"):
        query_vector(model, {"photo": big})
    with pytest.raises(QueryError, match=r"the .photo. query .*wide\.png is refused \(too_large\)"):
        query_vector(model, {"photo": str(wide)})
    small = RecordLimits(**{**DEFAULT_LIMITS.__dict__, "max_member_bytes": 64})
    with pytest.raises(QueryError, match=r"is refused \(member_too_large\)"):
        query_vector(model, {"photo": big}, limits=small)  # over max_member_bytes: not read
    assert decoded == []


def test_small_query_files_still_search(tmp_path: Path, model: AlignmentModel) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(photo)
    tone = tmp_path / "tone.wav"
    soundfile.write(tone, np.sin(np.arange(8000) * 0.05).astype(np.float32), 16000)
    for name, path in (("photo", photo), ("sound", tone)):
        vector = query_vector(model, {name: str(path)})
        expected = model.encode(name, [str(path)], batch_size=1).float()[0]
        assert torch_close(vector, expected)


def torch_close(found: Any, expected: Any) -> bool:
    return bool(np.allclose(found.detach().numpy(), expected.detach().numpy(), atol=1e-5))
