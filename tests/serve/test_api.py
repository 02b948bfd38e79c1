"""The API in-process (FastAPI's TestClient over httpx): /search and clip-retrieval's
/knn-service return the rows of ``mmalign search`` (keys, and scores within 1e-6) for text,
image, audio and composed queries, at full dim and at a Matryoshka prefix; /metadata,
/indices-list, /items, /metrics and the batcher's batches."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from mmalign.cli.main import main
from mmalign.demo.digits import dtmf_clip
from mmalign.serve.app import create_app
from mmalign.serve.catalog import load_catalog
from tests.serve_support import ServedFixture, digit_png


@pytest.fixture(scope="module")
def files(served: ServedFixture) -> dict[str, Path]:
    """A query image (PNG) and a query clip (WAV) on disk, for the CLI."""
    rng = np.random.default_rng(7)
    image = served.export.parent / "query.png"
    image.write_bytes(digit_png(7, rng))
    audio = served.export.parent / "query.wav"
    soundfile.write(audio, dtmf_clip(7, rng), 16000)
    return {"image": image, "audio": audio}


@pytest.fixture(scope="module")
def client(served: ServedFixture) -> Iterator[TestClient]:
    catalog = load_catalog([str(served.export), f"small={served.export16}"], served.model_dir)
    with TestClient(create_app(catalog)) as client:
        yield client


def cli_rows(export: Path, *arguments: str) -> list[dict]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["search", str(export), "--json", *arguments]) == 0
    return [json.loads(line) for line in printed.getvalue().splitlines()]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same_rows(served_rows: list[dict], cli: list[dict], score: str = "score") -> None:
    assert [row["key"] for row in served_rows] == [row["key"] for row in cli]
    np.testing.assert_allclose(
        [row[score] for row in served_rows], [row["score"] for row in cli], rtol=0, atol=1e-6
    )


QUERIES = {
    "text": (["--text", "the digit seven"], lambda f: {"text": "the digit seven"}),
    "image": (lambda f: ["--image", str(f["image"])], lambda f: {"image": b64(f["image"])}),
    "audio": (lambda f: ["--audio", str(f["audio"])], lambda f: {"audio": b64(f["audio"])}),
    "composed": (
        lambda f: [
            "--text",
            "the digit seven",
            "--audio",
            str(f["audio"]),
            "--weights",
            "audio=0.5",
        ],
        lambda f: {"text": "the digit seven", "audio": b64(f["audio"])},
    ),
}


@pytest.mark.parametrize("kind", list(QUERIES))
@pytest.mark.parametrize("target", ["image", "text"])
def test_search_equals_the_cli_at_full_dim_and_a_prefix(
    client: TestClient, served: ServedFixture, files: dict[str, Path], kind: str, target: str
) -> None:
    cli_args, body_query = QUERIES[kind]
    arguments = cli_args(files) if callable(cli_args) else cli_args
    weights = {"audio": 0.5} if kind == "composed" else None
    body = {
        "index": "emb",
        "target": target,
        "k": 12,
        "query": body_query(files),
        "weights": weights,
    }
    full = client.post("/search", json=body)
    assert full.status_code == 200, full.text
    assert full.json()["dim"] == 32
    expected = cli_rows(served.export, *arguments, "--target", target, "--k", "12")
    assert_same_rows(full.json()["results"], expected)
    if target == "image":  # the prefix: an in-memory view of emb, and emb16's own index
        expected16 = cli_rows(served.export16, *arguments, "--target", "image", "--k", "12")
        for index, dim in (("emb", 16), ("small", None)):
            prefix = client.post("/search", json={**body, "index": index, "dim": dim})
            assert prefix.status_code == 200, prefix.text
            assert prefix.json()["dim"] == 16
            assert_same_rows(prefix.json()["results"], expected16)


def test_knn_service_takes_clip_retrievals_client_bodies(
    client: TestClient, served: ServedFixture, files: dict[str, Path]
) -> None:
    # the body ClipClient.query(text=...) sends (its defaults), as a string without a
    # content type, as requests.post(data=json.dumps(...)) does
    body = {
        "text": "the digit seven",
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "emb",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 5,
        "num_result_ids": 5,
        "verbose": False,
    }
    answer = client.post("/knn-service", content=json.dumps(body))
    assert answer.status_code == 200, answer.text
    rows = answer.json()
    expected = cli_rows(served.export, "--text", "the digit seven", "--target", "image", "--k", "5")
    assert_same_rows(rows, expected, score="similarity")
    assert set(rows[0]) >= {"id", "similarity", "url", "caption", "cls"}
    image = client.get(rows[0]["url"])
    assert image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
    # ids are rows of /metadata
    metadata = client.post("/metadata", json={"ids": [rows[0]["id"]], "indice_name": "emb"})
    assert metadata.json() == [
        {
            "id": rows[0]["id"],
            "metadata": {k: v for k, v in rows[0].items() if k not in ("id", "similarity")},
        }
    ]
    # an image query (base64) and an embedding_input, text modality
    by_image = {**body, "text": None, "image": b64(files["image"]), "modality": "text"}
    expected = cli_rows(
        served.export, "--image", str(files["image"]), "--target", "text", "--k", "5"
    )
    assert_same_rows(client.post("/knn-service", json=by_image).json(), expected, "similarity")
    vector = np.random.default_rng(0).normal(size=32)
    vector = (vector / np.linalg.norm(vector)).tolist()
    by_vector = {
        **body,
        "text": None,
        "embedding_input": vector,
        "num_images": 3,
        "num_result_ids": 3,
    }
    found = client.post("/knn-service", json=by_vector).json()
    assert len(found) == 3 and found[0]["similarity"] >= found[1]["similarity"]
    assert client.get("/indices-list").json() == ["emb", "small"]
    # a Matryoshka prefix: the index "small" holds the first 16 coordinates
    expected = cli_rows(
        served.export16, "--text", "the digit seven", "--target", "image", "--k", "5"
    )
    small = client.post("/knn-service", json={**body, "indice_name": "small"}).json()
    assert_same_rows(small, expected, score="similarity")


def test_filters_items_and_metrics(client: TestClient) -> None:
    body = {"index": "emb", "target": "image", "k": 3, "query": {"text": "the digit two"}}
    everything = client.post("/search", json={**body, "k": 40}).json()["results"]
    filtered = client.post("/search", json={**body, "filters": {"cls": 2}}).json()["results"]
    twos = [row for row in everything if row["cls"] == 2][:3]
    assert [row["key"] for row in filtered] == [row["key"] for row in twos]
    assert [row["rank"] for row in filtered] == [1, 2, 3]
    items = filtered[0]["items"]
    assert set(items) == {"image", "text", "audio"}
    assert client.get(items["text"]).text == "the digit two"
    assert client.get(items["audio"]).content[:4] == b"fLaC"
    metrics = client.get("/metrics").text
    assert 'mmalign_requests_total{route="/search",status="200"}' in metrics
    assert "mmalign_batch_size_count" in metrics
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text
