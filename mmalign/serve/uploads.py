"""Query values of a request to the raw samples a tower takes, within limits.

An image or audio query arrives as base64 in the JSON body: its size is capped
(:data:`MAX_UPLOAD_BYTES`, before decoding) and it is decoded by the same code, with the same
per-record header limits, as a training record (:func:`mmalign.data.decode.decode_value`
with :data:`~mmalign.data.limits.DEFAULT_LIMITS`: sample rate, duration, decoded size).
Text is a string (at most :data:`MAX_TEXT_CHARS`), a tabular value a list of numbers, a
graph an object with ``x`` and ``edge_index``. Every refusal is a
:class:`~mmalign.serve.problems.RequestError` naming the field.

Example:
    >>> raw_sample("text", "query.text", "the digit seven")
    'the digit seven'
    >>> try:
    ...     raw_sample("image", "query.image", "not base64!")
    ... except RequestError as error:
    ...     print(error.payload()["field"])
    query.image
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from mmalign.data.decode import RecordError, decode_value, graph_from_arrays
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.serve.problems import RequestError

MAX_UPLOAD_BYTES = 8 << 20
"""Largest image or audio file a query may carry (8 MiB, before decoding)."""
MAX_TEXT_CHARS = 2000
"""Longest text query (characters; the tokenizer keeps far fewer tokens)."""
FILE_EXTENSIONS = {"image": "png", "audio": "flac"}
"""The extension a file query is decoded as per tower type (the decoders read the actual
format from the bytes: JPEG, WebP, WAV... all decode)."""


def decode_base64(field: str, value: Any, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is dropped), refused
    when not a string, not base64 or over ``max_bytes``.

    Example:
        >>> decode_base64("image", "aGk=")
        b'hi'
    """
    if not isinstance(value, str):
        raise RequestError(field, f"expected a base64 string, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(text) * 3 // 4 > max_bytes:
        raise RequestError(
            field, f"the file is over {max_bytes:,} bytes", "send a smaller file", status=413
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            field, "the value is not valid base64", "encode the file's bytes"
        ) from None


def decode_file(field: str, kind: str, data: bytes, limits: RecordLimits = DEFAULT_LIMITS) -> Any:
    """The decoded image (``PIL.Image``) or audio (``(waveform, rate)``) of a file's bytes,
    under the per-record limits (the size of the file itself is capped by
    :func:`decode_base64`); else a :class:`RequestError` naming ``field``."""
    try:
        return decode_value(FILE_EXTENSIONS[kind], data, limits)
    except RecordError as error:
        wanted = "a PNG/JPEG/WebP image" if kind == "image" else "a WAV/FLAC/OGG clip"
        raise RequestError(field, f"cannot be read as {kind}: {error}", f"send {wanted}") from None


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(field, "expected a non-empty string", "type a query")
    if len(value) > MAX_TEXT_CHARS:
        raise RequestError(field, f"the text is over {MAX_TEXT_CHARS} characters", "shorten it")
    return value


def _tabular(field: str, value: Any) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise RequestError(field, "expected a list of numbers", "send e.g. [0.1, 2.5]")
    return [float(v) for v in value]


def _graph(field: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise RequestError(field, "expected an object with x and edge_index", "")
    try:
        return graph_from_arrays(value)
    except (RecordError, ValueError, TypeError) as error:
        raise RequestError(
            field, f"not a graph: {error}", "send x [N, F] and edge_index [2, E]"
        ) from None


def raw_sample(kind: str, field: str, value: Any) -> Any:
    """The raw sample a JSON query value stands for, for a tower of type ``kind``.

    Example:
        >>> raw_sample("tabular", "query.labs", [1, 2.5])
        [1.0, 2.5]
    """
    if kind in FILE_EXTENSIONS:
        return decode_file(field, kind, decode_base64(field, value))
    if kind == "text":
        return _text(field, value)
    if kind == "tabular":
        return _tabular(field, value)
    if kind == "graph":
        return _graph(field, value)
    raise RequestError(field, f"queries of {kind} towers are not served", "query another modality")
