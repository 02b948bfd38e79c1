"""Per-extension decoding of record files, with a reason for every failure.

The decoded value is what a tower's ``preprocess`` receives:

==========================  ==================================================  ============
extension                   value                                               on failure
==========================  ==================================================  ============
jpg png webp ... (PIL)      ``PIL.Image`` in RGB                                bad_image
txt text                    ``str`` (UTF-8)                                     bad_text
json jsn                    the parsed object                                   bad_json
graph.json, npz             ``{"x": [N, F] float32, "edge_index": [2, E]        bad_json /
                            int64, "edge_attr"?: [E, D] float32}``              bad_graph
wav flac ogg                ``(waveform float32 [T] or [C, T], sample_rate)``   bad_audio
npy                         ``np.ndarray`` (numbers only)                       bad_array
csv                         ``{column name: float32 [rows]}`` (empty: NaN)      bad_csv
mp4 webm mkv mov avi        :class:`~mmalign.data.video.EncodedVideo`           bad_video
                            (header read, frames decoded on demand)
mp4 ... (``audio`` tower)   ``(mono float32 [T], sample_rate)``: the video's    bad_audio /
                            audio track (``video.decode_audio_track``)          no_audio_track
npz (``timeseries`` tower)  ``{name: array}`` (numbers, signal limits)          bad_array
cls                         ``int``                                             bad_label
anything else               the raw ``bytes``
==========================  ==================================================  ============

A zero-byte file fails as ``empty_file`` whatever its extension. An image with a zero side
fails as ``bad_image``; one larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs;
raise that limit to accept bigger ones) as ``too_large``, from its header. Audio, images,
videos, npy, npz and csv files are first checked against the per-record limits
(:mod:`mmalign.data.limits`) from their headers, before decoding: ``bad_sample_rate``,
``too_long``, ``too_large``.

Example:
    >>> decode_value("cls", b"7")
    7
    >>> decode_value("json", b"{broken")
    Traceback (most recent call last):
    ...
    mmalign.data.record_error.RecordError: bad_json: ...
"""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from webdataset.autodecode import IMAGE_EXTENSIONS

from mmalign.config.extensions import parse_alternatives
from mmalign.data.audio_header import check_audio_header
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.record_error import RecordError, check_decoded_size
from mmalign.data.video import VIDEO_EXTENSIONS, decode_audio_track, decode_video

AUDIO_EXTENSIONS = ("wav", "flac", "ogg")
TEXT_EXTENSIONS = ("txt", "text")
JSON_EXTENSIONS = ("json", "jsn")
LABEL_EXTENSIONS = ("cls",)


def _check_image_header(image: Image.Image, limits: RecordLimits) -> None:
    """The size an opened (not yet decoded) image's header claims: no zero side, at most
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (``too_large``), within ``max_decoded_bytes``."""
    if min(image.size) < 1:
        raise ValueError(f"the image is {image.width}x{image.height} pixels")
    pixels, most = image.width * image.height, Image.MAX_IMAGE_PIXELS
    if most is not None and pixels > most:
        raise RecordError(
            "too_large",
            f"the image is {image.width}x{image.height} ({pixels:,} pixels), over "
            f"PIL.Image.MAX_IMAGE_PIXELS ({most:,}, a decompression bomb)",
        )
    bands = max(len(image.getbands()), 3)  # converted to RGB
    check_decoded_size(pixels * bands, "the image", limits)


def _image(data: bytes, limits: RecordLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():  # PIL warns from 1x its pixel limit: checked here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                _check_image_header(image, limits)
                image.load()
                return image.convert("RGB")
    except Image.DecompressionBombError as error:  # from 2x the limit PIL refuses to open it
        raise RecordError(
            "too_large", f"the image is over twice PIL.Image.MAX_IMAGE_PIXELS: {error}"
        ) from None


def _audio(data: bytes, limits: RecordLimits) -> tuple[np.ndarray, int]:
    check_audio_header(soundfile.info(io.BytesIO(data)), limits)
    waveform, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if waveform.shape[0] == 0:
        raise ValueError("the clip has no samples")
    channels_first = np.ascontiguousarray(waveform.T)
    return (channels_first[0] if channels_first.shape[0] == 1 else channels_first), sample_rate


def graph_from_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate and convert ``x`` / ``edge_index`` / ``edge_attr`` into a graph dict.

    Example:
        >>> graph_from_arrays({"x": [[0.0], [1.0]], "edge_index": [[0, 1], [1, 0]]})["x"].shape
        (2, 1)
    """
    if "x" not in arrays or "edge_index" not in arrays:
        raise RecordError("bad_graph", "a graph needs 'x' ([N, F]) and 'edge_index' ([2, E])")
    x = np.asarray(arrays["x"], dtype=np.float32)
    edge_index = np.asarray(arrays["edge_index"], dtype=np.int64).reshape(2, -1)
    if x.ndim != 2:
        raise RecordError("bad_graph", f"'x' must be [N, F], got shape {list(x.shape)}")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= x.shape[0]):
        raise RecordError("bad_graph", f"'edge_index' refers to nodes outside 0..{x.shape[0] - 1}")
    graph: dict[str, np.ndarray] = {"x": x, "edge_index": edge_index}
    if arrays.get("edge_attr") is not None:
        edge_attr = np.asarray(arrays["edge_attr"], dtype=np.float32)
        if edge_attr.shape[0] != edge_index.shape[1]:
            raise RecordError("bad_graph", "'edge_attr' needs one row per edge")
        graph["edge_attr"] = edge_attr.reshape(edge_index.shape[1], -1)
    return graph


def _graph_json(data: bytes, limits: RecordLimits) -> dict[str, np.ndarray]:
    try:
        parsed = json.loads(data)
    except ValueError as error:
        raise RecordError("bad_json", str(error)) from None
    if not isinstance(parsed, dict):
        raise RecordError("bad_graph", "graph.json must hold an object with 'x' and 'edge_index'")
    return graph_from_arrays(parsed)


def _npz_arrays(data: bytes, limits: RecordLimits) -> dict[str, np.ndarray]:
    """The arrays of an npz, its expanded size (the zip directory) checked first."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:  # reads the zip directory
        check_decoded_size(sum(item.file_size for item in arrays.zip.infolist()), "the npz", limits)
        return dict(arrays)


def _graph_npz(data: bytes, limits: RecordLimits) -> dict[str, np.ndarray]:
    return graph_from_arrays(_npz_arrays(data, limits))


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def check_signal_shape(samples: int, channels: int, what: str, limits: RecordLimits) -> None:
    """Raise :class:`RecordError` when a signal of ``channels x samples`` is over
    ``max_signal_samples`` (``too_long``) or ``max_signal_channels`` (``too_large``).

    Example:
        >>> check_signal_shape(10**9, 2, "the npy", DEFAULT_LIMITS)
        Traceback (most recent call last):
        ...
        mmalign.data.record_error.RecordError: too_long: ...
    """
    if samples > limits.max_signal_samples:
        raise RecordError(
            "too_long",
            f"{what} holds {samples} samples, over data.max_signal_samples "
            f"({limits.max_signal_samples})",
        )
    if channels > limits.max_signal_channels:
        raise RecordError(
            "too_large",
            f"{what} holds {channels} channels, over data.max_signal_channels "
            f"({limits.max_signal_channels})",
        )


def _npy(data: bytes, limits: RecordLimits) -> np.ndarray:
    """Check the header (numeric dtype, size, signal shape of 1 or 2 axes), then load."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"npy format version {version} is not supported")
    shape, _, dtype = _NPY_HEADER_READERS[version](stream)
    if dtype.kind not in "biuf":
        raise ValueError(f"the npy holds dtype {dtype}; only numbers (bool, int, float) load")
    check_decoded_size(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, "the npy", limits)
    if 1 <= len(shape) <= 2:
        check_signal_shape(shape[-1], shape[0] if len(shape) == 2 else 1, "the npy", limits)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _signal_npz(data: bytes, limits: RecordLimits) -> dict[str, np.ndarray]:
    """An npz read by a time-series tower: name -> numeric array, each within the signal
    limits (the tower takes its single array, or its ``npz_key``)."""
    arrays = _npz_arrays(data, limits)
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ValueError(f"array {name!r} holds dtype {array.dtype}; only numbers load")
        if 1 <= array.ndim <= 2:
            channels = array.shape[0] if array.ndim == 2 else 1
            check_signal_shape(array.shape[-1], channels, f"the npz's {name!r}", limits)
    return arrays


def _csv(data: bytes, limits: RecordLimits) -> dict[str, np.ndarray]:
    """A CSV with a header row of column names: name -> float32 column (empty cells NaN);
    rows and columns are checked against the signal limits before parsing."""
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    header = data.split(b"\n", 1)[0]
    check_signal_shape(lines - 1, header.count(b",") + 1, "the csv", limits)
    names = [name.strip() for name in header.decode("utf-8").split(",")]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"the header row must name every column once, got {names}")
    table = np.loadtxt(
        io.BytesIO(data),
        delimiter=",",
        skiprows=1,
        dtype=np.float32,
        ndmin=2,
        converters=lambda cell: float(cell) if cell.strip() else np.nan,
    )
    if table.shape[0] == 0 or table.shape[1] != len(names):
        raise ValueError(f"the csv has {table.shape[0]} rows of {table.shape[1]} columns")
    return {name: np.ascontiguousarray(table[:, index]) for index, name in enumerate(names)}


def _text(data: bytes, limits: RecordLimits) -> str:
    return data.decode("utf-8")


def _json(data: bytes, limits: RecordLimits) -> Any:
    return json.loads(data)


LABELS = range(-(2**63), 2**63)
"""The integers a label may be: what an int64 tensor or Parquet column holds."""


def as_label(value: Any) -> int:
    """``value`` as a class label; a ``ValueError`` unless it is an integer in :data:`LABELS`.

    Example:
        >>> as_label(" 7")
        7
        >>> as_label("99999999999999999999")
        Traceback (most recent call last):
        ...
        ValueError: label 99999999999999999999 is outside the int64 range
    """
    label = int(value)
    if label not in LABELS:
        raise ValueError(f"label {label} is outside the int64 range")
    return label


def _label(data: bytes, limits: RecordLimits) -> int:
    return as_label(data.decode("ascii"))


_DECODERS: dict[str, tuple[str, Callable[[bytes, RecordLimits], Any]]] = {
    "npz": ("bad_graph", _graph_npz),
    "npy": ("bad_array", _npy),
    "csv": ("bad_csv", _csv),
    **{ext: ("bad_video", decode_video) for ext in VIDEO_EXTENSIONS},
    **{ext: ("bad_text", _text) for ext in TEXT_EXTENSIONS},
    **{ext: ("bad_json", _json) for ext in JSON_EXTENSIONS},
    **{ext: ("bad_label", _label) for ext in LABEL_EXTENSIONS},
    **{ext: ("bad_audio", _audio) for ext in AUDIO_EXTENSIONS},
    **{ext: ("bad_image", _image) for ext in IMAGE_EXTENSIONS},
}


_TOWER_DECODERS: dict[tuple[str, str], tuple[str, Callable[[bytes, RecordLimits], Any]]] = {
    **{("audio", ext): ("bad_audio", decode_audio_track) for ext in VIDEO_EXTENSIONS},
    ("timeseries", "npz"): ("bad_array", _signal_npz),
}
"""Files a tower type reads its own way: a video's audio track for an ``audio`` tower
(``no_audio_track`` without one), an npz's arrays (not a graph) for a ``timeseries`` one."""


def _decoder(
    extension: str, kind: str | None
) -> tuple[str, Callable[[bytes, RecordLimits], Any]] | None:
    """(failure reason, decode function) for an extension read by a tower type, None for
    raw bytes."""
    if extension == "graph.json" or extension.endswith(".graph.json"):
        return "bad_graph", _graph_json
    last = extension.rsplit(".", 1)[-1]
    return _TOWER_DECODERS.get((kind or "", last)) or _DECODERS.get(last)


def decode_value(
    extension: str, data: bytes, limits: RecordLimits = DEFAULT_LIMITS, kind: str | None = None
) -> Any:
    """Decode one record file by its extension (and the ``kind`` of tower that reads it, see
    ``_TOWER_DECODERS``); raises :class:`RecordError` with a reason (also when a header is
    over one of ``limits``)."""
    if len(data) == 0:
        raise RecordError("empty_file", f"the .{extension} file is empty (zero bytes)")
    decoder = _decoder(extension.lower(), kind)
    if decoder is None:
        return data
    reason, decode = decoder
    try:
        return decode(data, limits)
    except RecordError:
        raise
    except Exception as error:  # every library raises its own error type for bad bytes
        raise RecordError(reason, f".{extension}: {type(error).__name__}: {error}") from None


SIGNAL_EXTENSIONS = ("npy", "npz", "csv")
"""Files a ``timeseries`` tower reads."""
FILE_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("png", "jpg", "webp", *IMAGE_EXTENSIONS),
    "audio": (*AUDIO_EXTENSIONS, *VIDEO_EXTENSIONS),
    "video": VIDEO_EXTENSIONS,
    "timeseries": SIGNAL_EXTENSIONS,
    "graph": ("graph.json",),
}
"""Tower types whose samples can be files -> the extensions they read, in a record or as a
query file. A file named otherwise is read as the first: Pillow, soundfile and PyAV find the
real format from the content; a graph file is JSON."""


def file_extension(path: str | Path, kind: str) -> str:
    """The extension that picks the decoder of a file given as a sample of a ``kind`` tower:
    the file's own when the tower reads it (``clip.mp4`` for an ``audio`` tower: the
    video's audio track), else the first of :data:`FILE_KINDS`.

    Example:
        >>> file_extension("clip.MP4", "audio"), file_extension("tone", "audio")
        ('mp4', 'wav')
        >>> file_extension("ecg.npz", "timeseries"), file_extension("ecg.dat", "timeseries")
        ('npz', 'npy')
    """
    readable = FILE_KINDS[kind]
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in readable else readable[0]


def decode_file(path: str | Path, kind: str, limits: RecordLimits = DEFAULT_LIMITS) -> Any:
    """A file given as one sample of a tower of type ``kind`` (one of :data:`FILE_KINDS`; a
    search query), decoded exactly as a record's file of that tower is: its size against
    ``max_member_bytes``, then its header against the other limits, before decoding; the
    decoder is the tower's choice for the file's extension (:func:`file_extension`: an mp4 is
    a video for a ``video`` tower and its audio track for an ``audio`` one); a
    :class:`RecordError` otherwise.

    Example:
        >>> decode_file("huge.png", "image")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        mmalign.data.decode.RecordError: too_large: the image would decode to 412.0 MiB, ...
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # /dev/zero, a FIFO: st_size says nothing
        raise RecordError("not_a_file", f"{path} is not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(limits.max_member_bytes + 1)  # bounded, whatever the file became
    if len(data) > limits.max_member_bytes:
        raise RecordError(
            "member_too_large",
            f"{path} is over data.max_member_bytes ({limits.max_member_bytes / 2**20:.1f} MiB)",
        )
    extension = file_extension(path, kind)
    return decode_value(extension, data, limits, kind)


def find_file(sample: Mapping[str, Any], alternatives: tuple[str, ...]) -> str | None:
    """The first of ``alternatives`` present in a raw sample, or None."""
    return next((ext for ext in alternatives if ext in sample), None)


def parse_fields(fields: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Name -> extension spec (``{"image": "jpg;png"}``) to name -> alternatives."""
    return {name: parse_alternatives(spec) for name, spec in fields.items()}


def decode_fields(
    sample: Mapping[str, Any],
    fields: Mapping[str, tuple[str, ...]],
    limits: RecordLimits = DEFAULT_LIMITS,
    kinds: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """Decode the configured fields present in a raw sample (``kinds``: field -> the type of
    tower that reads it, see :func:`decode_value`); absent fields are left out.

    Example:
        >>> decode_fields({"txt": b"seven", "cls": b"7"}, {"text": ("txt",), "audio": ("flac",)})
        {'text': 'seven'}
    """
    values = {}
    for name, alternatives in fields.items():
        extension = find_file(sample, alternatives)
        if extension is not None:
            kind = (kinds or {}).get(name)
            values[name] = decode_value(extension, sample[extension], limits, kind)
    return values
