"""One search as the service runs it: the query values of a request to raw samples, encoded
by the dynamic batcher, combined by the model's objective exactly as ``mmalign search`` does
(:func:`mmalign.export.search.check_query` and :func:`~mmalign.export.search.combine_query`),
looked up in the served index at the requested dim, filtered on metadata.

Example:
    >>> asking = SearchQuery(query={"text": "a seven"}, k=5)
    >>> served, target, rows = await find(catalog, batcher, asking)  # doctest: +SKIP
    >>> rows[0]["key"], rows[0]["score"]  # doctest: +SKIP
    ('test-000017', 0.83)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.export.search import QueryError, check_query, combine_query
from mmalign.serve.batcher import DynamicBatcher
from mmalign.serve.catalog import Catalog, ServedExport
from mmalign.serve.problems import RequestError
from mmalign.serve.uploads import raw_sample


@dataclass
class SearchQuery:
    """What to search: the export (``index``), the indexed modality (``target``), ``dim``,
    ``k``, query values by modality or tower type, pairwise ``weights``, metadata
    ``filters`` (field -> the value a row must have)."""

    query: Mapping[str, Any]
    k: int = 10
    index: str | None = None
    target: str | None = None
    dim: int | None = None
    weights: Mapping[str, float] | None = None
    filters: Mapping[str, Any] = field(default_factory=dict)


def raw_queries(catalog: Catalog, query: Mapping[str, Any]) -> dict[str, Any]:
    """Modality -> raw sample of a request's ``query`` (keys: modalities or tower types)."""
    if not query:
        raise RequestError("query", "the query is empty", "give at least one modality")
    raws: dict[str, Any] = {}
    config = catalog.model.config
    for name, value in query.items():
        modality = config.modality_named(name)
        if modality is None:
            raise RequestError(
                f"query.{name}",
                f"the model has no modality or tower type {name!r}",
                f"use one of {catalog.model.modalities}",
            )
        if modality in raws:
            raise RequestError(f"query.{name}", f"a second query for {modality!r}", "give one")
        raws[modality] = raw_sample(config.towers[modality].type, f"query.{name}", value)
    return raws


def _weights(catalog: Catalog, weights: Mapping[str, float] | None) -> dict[str, float] | None:
    if not weights:
        return None
    resolved = {}
    for name, value in weights.items():
        modality = catalog.model.config.modality_named(name)
        if modality is None:
            raise RequestError(f"weights.{name}", f"no modality or tower type {name!r}", "")
        resolved[modality] = value
    return resolved


async def query_vector(
    catalog: Catalog,
    batcher: DynamicBatcher,
    raws: Mapping[str, Any],
    dim: int,
    weights: Mapping[str, float] | None,
) -> torch.Tensor:
    """The objective's query vector at ``dim`` (the towers' forward passes batched with
    other requests'); a sample a tower refuses is a 422 naming its modality."""
    try:
        checked = check_query(catalog.model, raws, _weights(catalog, weights))
    except QueryError as error:
        raise RequestError("weights", str(error)) from None
    encode_dim = None if dim == catalog.model.dim else dim
    names = list(raws)
    results = await asyncio.gather(
        *(batcher.encode(name, raws[name], encode_dim) for name in names), return_exceptions=True
    )
    embeddings = {}
    for name, result in zip(names, results):
        if isinstance(result, BaseException):
            raise RequestError(f"query.{name}", f"the {name} tower cannot take it: {result}")
        embeddings[name] = result
    return combine_query(catalog.model, embeddings, checked)


def _matches(row: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    return all(row.get(name) == value for name, value in filters.items())


def lookup(
    served: ServedExport,
    target: str,
    vector: torch.Tensor,
    k: int,
    dim: int | None,
    filters: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The ``k`` best rows for a query vector; with ``filters``, the ``k`` best of the rows
    whose metadata match (every row is scored, then filtered), ranks renumbered."""
    index = served.index(target, dim)
    unknown = sorted(set(filters) - set(index.table.column_names))
    if unknown:
        raise RequestError(
            f"filters.{unknown[0]}",
            "not a metadata field",
            f"use one of {index.table.column_names}",
        )
    if not filters:
        return index.search(vector[None], k)[0]
    rows = [
        row for row in index.search(vector[None], index.info["rows"])[0] if _matches(row, filters)
    ]
    return [{**row, "rank": rank + 1} for rank, row in enumerate(rows[:k])]


async def find(
    catalog: Catalog, batcher: DynamicBatcher, request: SearchQuery
) -> tuple[ServedExport, str, list[dict[str, Any]]]:
    """The served export, the indexed modality and the result rows of one search."""
    served = catalog.export(request.index)
    target = served.target(request.target)
    index = served.index(target, request.dim)
    raws = raw_queries(catalog, request.query)
    vector = await query_vector(catalog, batcher, raws, int(index.info["dim"]), request.weights)
    return served, target, lookup(served, target, vector, request.k, request.dim, request.filters)
