"""Bad requests: each kind is answered by a 4xx JSON error naming the field at fault (never
a 500, never a traceback), and the service keeps answering good requests afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from mmalign.serve.app import create_app
from mmalign.serve.catalog import load_catalog
from tests.serve_support import ServedFixture

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(served: ServedFixture) -> Iterator[TestClient]:
    catalog = load_catalog([str(served.export)], served.model_dir)
    with TestClient(create_app(catalog, token=TOKEN)) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb's
    header: the limits refuse it before any pixel is decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 4)
    idat = (
        struct.pack(">I", len(data))
        + b"IDAT"
        + data
        + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    )
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + end


def wav_at(rate: int, seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(rate * seconds), np.float32), rate, format="WAV")
    return buffer.getvalue()


GOOD = {"index": "emb", "target": "image", "k": 5, "query": {"text": "the digit seven"}}

# name: (method, path, keyword arguments of the request, status, field)
BAD = {
    "bad base64": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"image": "%%%not base64"}}},
        422,
        "query.image",
    ),
    "100 MB upload": ("post", "/search", {"content": b"x" * (100 << 20)}, 413, "body"),
    "unknown index": ("post", "/search", {"json": {**GOOD, "index": "nope"}}, 404, "index"),
    "k = 0": ("post", "/search", {"json": {**GOOD, "k": 0}}, 422, "k"),
    "k = 10^9": ("post", "/search", {"json": {**GOOD, "k": 10**9}}, 422, "k"),
    "k not a number": ("post", "/search", {"json": {**GOOD, "k": "five"}}, 422, "k"),
    "untrained dim": ("post", "/search", {"json": {**GOOD, "dim": 12}}, 422, "dim"),
    "dim = 0": ("post", "/search", {"json": {**GOOD, "dim": 0}}, 422, "dim"),
    "path traversal in an item": (
        "get",
        "/items/emb/image/..%2F..%2Fmodel%2Fconfig.json",
        {},
        404,
        "key",
    ),
    "path traversal in a page file": ("get", "/static/..%2F..%2Fapp.py", {}, 404, "path"),
    "malformed JSON": (
        "post",
        "/search",
        {"content": b'{"query": {"text": "a', "headers": {"Content-Type": "application/json"}},
        400,
        "body",
    ),
    "unknown body field": ("post", "/search", {"json": {**GOOD, "kk": 3}}, 422, "kk"),
    "unknown query modality": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"smell": "x"}}},
        422,
        "query.smell",
    ),
    "empty query": ("post", "/search", {"json": {**GOOD, "query": {}}}, 422, "query"),
    "empty text": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"text": "  "}}},
        422,
        "query.text",
    ),
    "text too long": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"text": "seven " * 1000}}},
        422,
        "query.text",
    ),
    "not an image": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"image": b64(b"GIF89a garbage")}}},
        422,
        "query.image",
    ),
    "image header over the limits": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"image": b64(png_claiming(40000, 40000))}}},
        422,
        "query.image",
    ),
    "audio rate outside the limits": (
        "post",
        "/search",
        {"json": {**GOOD, "query": {"audio": b64(wav_at(500))}}},
        422,
        "query.audio",
    ),
    "weights of an unqueried modality": (
        "post",
        "/search",
        {"json": {**GOOD, "weights": {"audio": 2.0}}},
        422,
        "weights",
    ),
    "unknown filter field": (
        "post",
        "/search",
        {"json": {**GOOD, "filters": {"colour": "red"}}},
        422,
        "filters.colour",
    ),
    "unknown target": ("post", "/search", {"json": {**GOOD, "target": "graph"}}, 422, "target"),
    "knn image_url": (
        "post",
        "/knn-service",
        {"json": {"image_url": "http://example.com/a.jpg", "num_images": 3, "indice_name": "emb"}},
        422,
        "image_url",
    ),
    "knn embedding of the wrong dim": (
        "post",
        "/knn-service",
        {"json": {"embedding_input": [0.1, 0.2], "num_images": 3, "indice_name": "emb"}},
        422,
        "embedding_input",
    ),
    "knn unknown indice_name": (
        "post",
        "/knn-service",
        {"json": {"text": "a", "num_images": 3, "indice_name": "laion5B"}},
        404,
        "indice_name",
    ),
    "metadata id out of range": (
        "post",
        "/metadata",
        {"json": {"ids": [10**6], "indice_name": "emb"}},
        422,
        "ids",
    ),
    "unknown item key": ("get", "/items/emb/image/row999", {}, 404, "key"),
    "unknown route": ("get", "/admin", {}, 404, "path"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_json_error_naming_the_field(client: TestClient, name: str) -> None:
    method, path, options, status, field = BAD[name]
    options = dict(options)
    headers = {**AUTH, **options.pop("headers", {})}
    answer = getattr(client, method)(path, headers=headers, **options)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["field"] == field and f"({field})" in body["detail"], body
    assert "Traceback" not in answer.text
    good = client.post("/search", json=GOOD, headers=AUTH)  # still serving
    assert good.status_code == 200 and len(good.json()["results"]) == 5


def test_the_token_is_required_when_set(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = client.post("/search", json=GOOD, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["field"] == "Authorization"
    assert client.get("/indices-list").status_code == 401
    assert client.get("/indices-list", params={"token": TOKEN}).json() == ["emb"]
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
