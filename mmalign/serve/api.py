"""mmalign's own routes: ``POST /search`` (any modality, composed queries, ``dim``,
metadata filters), ``GET /items/{index}/{modality}/{key}`` (a result's kept item),
``GET /indexes`` (what is served, for the page).

Example request (see docs/serving.md)::

    POST /search
    {"index": "emb", "target": "image", "k": 5, "dim": 32,
     "query": {"text": "the digit seven", "audio": "<base64 of a WAV>"}}

answers ``{"index": "emb", "target": "image", "dim": 32, "results": [{"rank": 1, "score":
0.41, "key": "test-000017", "cls": 7, "items": {"image": "/items/emb/image/test-000017"}},
...]}``.
"""

from __future__ import annotations

import functools
import mimetypes
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from mmalign.serve.catalog import Catalog, ServedExport
from mmalign.serve.service import SearchQuery, find

MAX_K = 1000
"""Most results one request may ask for."""

router = APIRouter()


class SearchRequest(BaseModel):
    """The body of ``POST /search``: unknown fields are refused, naming the field."""

    model_config = ConfigDict(extra="forbid")

    query: dict[str, Any] = Field(description="modality or tower type -> value")
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    index: str | None = Field(None, description="served export (default: the first)")
    target: str | None = Field(None, description="indexed modality (default: the only one)")
    dim: int | None = Field(None, ge=1, description="a trained Matryoshka prefix")
    weights: dict[str, float] | None = Field(None, description="pairwise query weights")
    filters: dict[str, Any] = Field(default_factory=dict, description="field -> value")


@functools.lru_cache(maxsize=1024)
def _item_route(index: str, modality: str) -> str:
    """``/items/INDEX/MODALITY/``, quoted once per pair (not for every result row)."""
    return f"/items/{quote(index)}/{quote(modality)}/"


def item_links(served: ServedExport, key: str) -> dict[str, str]:
    """Modality -> URL of each kept item of the row ``key``."""
    quoted = quote(key)
    return {
        modality: _item_route(served.name, modality) + quoted
        for modality, items in served.items.items()
        if key in items
    }


@router.post("/search")
async def search(body: SearchRequest, request: Request) -> dict[str, Any]:
    """The ``k`` best rows of an index for a (composed) query."""
    state = request.app.state
    query = SearchQuery(**body.model_dump())
    served, target, rows = await find(state.catalog, state.batcher, query)
    dim = body.dim or served.indexes[target].info["dim"]
    results = [{**row, "items": item_links(served, row["key"])} for row in rows]
    return {"index": served.name, "target": target, "dim": dim, "results": results}


@router.get("/indexes")
async def indexes(request: Request) -> dict[str, Any]:
    """Every served export: its indexed modalities and their dims, its kept items, the
    model's query modalities by tower type."""
    catalog: Catalog = request.app.state.catalog
    model = catalog.model
    return {
        "modalities": {name: model.config.towers[name].type for name in model.modalities},
        "indexes": {
            served.name: {
                "targets": {target: served.dims(target) for target in served.indexes},
                "items": list(served.items),
            }
            for served in catalog.exports.values()
        },
    }


@router.get("/items/{index}/{modality}/{key:path}")
async def item(index: str, modality: str, key: str, request: Request) -> Response:
    """The kept source file of one row (only keys of the export exist: never a path)."""
    served = request.app.state.catalog.export(index)
    extension, data = served.item(modality, key)
    if extension in ("txt", "text"):
        return Response(data, media_type="text/plain; charset=utf-8")
    media = mimetypes.guess_type(f"item.{extension}")[0] or "application/octet-stream"
    return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})
