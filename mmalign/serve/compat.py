"""clip-retrieval's ``clip back`` API, so that its front end and clients work unchanged:
``POST /knn-service``, ``GET /indices-list``, ``POST /metadata``.

``/knn-service`` takes clip-retrieval's body: ``text``, ``image`` (base64),
``embedding_input`` (a vector of the index's dim), ``modality`` (the indexed modality:
``image`` or ``text``, or any modality or tower type), ``num_images``, ``num_result_ids``
(default ``num_images``), ``indice_name``; it answers a list of ``{"id", "similarity",
...metadata}`` (metadata for the first ``num_images``), where ``id`` is the row number of
the export (the key of ``/metadata``) and the metadata adds ``url`` (the kept image) and
``caption`` (the kept text) when the export kept them. ``image_url`` is refused (the service
fetches nothing). As in a ``clip back`` started without those models, ``use_mclip`` (the
model's own text tower encodes), ``use_safety_model``, ``use_violence_detector``,
``aesthetic_score``/``aesthetic_weight`` and ``deduplicate`` are accepted and change nothing
(clip-retrieval's ``ClipClient`` sends them all by default).

Example request (clip-retrieval's client sends this)::

    POST /knn-service
    {"text": "a seven", "modality": "image", "num_images": 5, "indice_name": "emb"}
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmalign.serve.api import MAX_K, item_links
from mmalign.serve.catalog import ServedExport
from mmalign.serve.problems import RequestError, validation_problem
from mmalign.serve.service import lookup, query_vector, raw_queries

router = APIRouter()


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` body (its other fields are accepted and ignored,
    see the module docstring)."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: str = "image"
    num_images: int = Field(ge=1, le=MAX_K)
    num_result_ids: int | None = Field(None, ge=1, le=MAX_K)
    indice_name: str | None = None


class MetadataRequest(BaseModel):
    """clip-retrieval's ``/metadata`` body."""

    ids: list[Any]
    indice_name: str | None = None


async def _vector(request: Request, body: KnnRequest, dim: int) -> torch.Tensor:
    state = request.app.state
    if body.embedding_input is not None:
        vector = torch.tensor(body.embedding_input, dtype=torch.float32)
        if vector.numel() != dim or not bool(torch.isfinite(vector).all()):
            raise RequestError("embedding_input", f"expected {dim} finite numbers", "")
        return vector
    given = {kind: value for kind, value in (("text", body.text), ("image", body.image)) if value}
    if len(given) != 1:
        raise RequestError("text", "give exactly one of text, image, embedding_input", "")
    raws = raw_queries(state.catalog, given)
    return await query_vector(state.catalog, state.batcher, raws, dim, None)


def clip_metadata(served: ServedExport, row: dict[str, Any]) -> dict[str, Any]:
    """A row's metadata as clip-retrieval shows it: the fields, plus ``url`` and
    ``caption`` from the kept image and text."""
    shown = {name: value for name, value in row.items() if name not in ("rank", "score")}
    links = item_links(served, row["key"])
    for modality, link in links.items():
        kind = served.model.config.towers[modality].type
        if kind == "image" and "url" not in shown:
            shown["url"] = link
        if kind == "text" and "caption" not in shown:
            shown["caption"] = served.items[modality][row["key"]][1].decode("utf-8", "replace")
    return shown


Body = TypeVar("Body", bound=BaseModel)


async def json_body(request: Request, model: type[Body]) -> Body:
    """The request's body as ``model``, read as JSON whatever its content type (as ``clip
    back`` does: clip-retrieval's client sends none)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        raise validation_problem(RequestValidationError(error.errors())) from None


@router.post("/knn-service")
async def knn_service(request: Request) -> list[dict[str, Any]]:
    """Nearest neighbours of a text, an image or an embedding, in clip-retrieval's shape."""
    body = await json_body(request, KnnRequest)
    if body.image_url:
        raise RequestError("image_url", "the service fetches no URL", "send the image as base64")
    served = request.app.state.catalog.export(body.indice_name, "indice_name")
    target = served.target(body.modality)
    dim = int(served.indexes[target].info["dim"])
    vector = await _vector(request, body, dim)
    rows = lookup(served, target, vector, body.num_result_ids or body.num_images, None, {})
    answer = []
    for position, row in enumerate(rows):
        shown = clip_metadata(served, row) if position < body.num_images else {}
        answer.append({**shown, "id": served.row_of_key[row["key"]], "similarity": row["score"]})
    return answer


@router.get("/indices-list")
async def indices_list(request: Request) -> list[str]:
    """The served exports' names."""
    return list(request.app.state.catalog.exports)


@router.post("/metadata")
async def metadata(request: Request) -> list[dict[str, Any]]:
    """The metadata of rows by id: ``[{"id": id, "metadata": {...}}, ...]``."""
    body = await json_body(request, MetadataRequest)
    served = request.app.state.catalog.export(body.indice_name, "indice_name")
    return [
        {"id": row_id, "metadata": clip_metadata(served, served.row(row_id))} for row_id in body.ids
    ]
