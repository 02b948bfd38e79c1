"""Retrieval metrics: recall@k, median rank and mAP, with several relevant items per query.

Relevance is equality of ids: gallery item ``g`` is relevant to query ``q`` when
``gallery_ids[g] == query_ids[q]`` (ids default to the row index, one relevant item each).

**Ties are pessimistic**: when a relevant item has exactly the same score as an irrelevant
one, the irrelevant one ranks first. A constant scorer therefore gets the worst possible
ranks, never a lucky ordering. Among relevant items with equal scores the order does not
change any metric.

Definitions (per query, averaged over queries that have at least one relevant item):

- ``R@k``: 1 if some relevant item ranks in the top ``k`` (CLIP_benchmark's recall@k).
- ``median_rank``: median over queries of the 1-based rank of the first relevant item.
- ``mAP``: mean over queries of average precision, the mean over relevant items of
  (relevant items ranked at or above it) / (its rank).

Scores are computed in chunks of queries (``chunk_size`` rows; by default as many as keep
the chunk near 4M scores), so the memory is O(chunk * gallery).

Example:
    >>> import torch
    >>> emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    >>> retrieval_metrics(emb, emb, ks=(1,))["q2g/R@1"]
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEFAULT_KS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 22
"""Score-matrix elements per chunk when ``chunk_size`` is not given (~32 MB per int64 copy)."""


def _id_list(ids: Any, length: int, name: str) -> list[Any]:
    values = ids.detach().cpu().tolist() if isinstance(ids, Tensor) else list(ids)
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} ids but the embeddings have {length} rows")
    return values


def _shared_codes(
    query_ids: Any, gallery_ids: Any, n_query: int, n_gallery: int
) -> tuple[Tensor, Tensor]:
    """Map both id lists to one integer code space (ids: any hashable values)."""
    if query_ids is None and gallery_ids is None:
        if n_query != n_gallery:
            raise ValueError(
                f"{n_query} queries and {n_gallery} gallery items: pass query_ids and "
                "gallery_ids to say which items match (row i matches row i by default)"
            )
        return torch.arange(n_query), torch.arange(n_gallery)
    query = _id_list(range(n_query) if query_ids is None else query_ids, n_query, "query_ids")
    gallery = _id_list(
        range(n_gallery) if gallery_ids is None else gallery_ids, n_gallery, "gallery_ids"
    )
    index: dict[Any, int] = {}
    codes = torch.tensor([index.setdefault(value, len(index)) for value in query + gallery])
    return codes[:n_query], codes[n_query:]


def pessimistic_order(scores: Tensor, relevant: Tensor) -> Tensor:
    """Relevance of each row's items sorted by descending score, irrelevant first on ties.

    Example:
        >>> pessimistic_order(torch.tensor([[0.5, 0.5, 0.1]]),
        ...                   torch.tensor([[True, False, False]])).tolist()
        [[False, True, False]]
    """
    irrelevant_first = torch.argsort(relevant.to(torch.int8), dim=1, stable=True)
    reordered = scores.gather(1, irrelevant_first)
    order = torch.argsort(reordered, dim=1, descending=True, stable=True)
    return relevant.gather(1, irrelevant_first.gather(1, order))


def _rank_statistics(
    queries: Tensor,
    gallery: Tensor,
    query_codes: Tensor,
    gallery_codes: Tensor,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """First relevant rank (1-based) and average precision of each query with a relevant item."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, gallery.shape[0]))
    first_ranks, precisions = [], []
    positions = torch.arange(1, gallery.shape[0] + 1, dtype=torch.float64)
    for start in range(0, queries.shape[0], chunk_size):
        relevant = query_codes[start : start + chunk_size, None] == gallery_codes[None, :]
        keep = relevant.any(dim=1)
        if not keep.any():
            continue
        ranked = pessimistic_order(
            queries[start : start + chunk_size][keep] @ gallery.T, relevant[keep]
        )
        hits = ranked.to(torch.float64)
        first_ranks.append(hits.argmax(dim=1) + 1)
        precision_at_hits = hits.cumsum(dim=1) / positions
        precisions.append((precision_at_hits * hits).sum(dim=1) / hits.sum(dim=1))
    if not first_ranks:
        raise ValueError("no query has a relevant gallery item: check query_ids / gallery_ids")
    return torch.cat(first_ranks).to(torch.float64), torch.cat(precisions)


def _one_direction(
    queries: Tensor,
    gallery: Tensor,
    query_codes: Tensor,
    gallery_codes: Tensor,
    ks: Sequence[int],
    chunk_size: int | None,
) -> dict[str, float]:
    ranks, precisions = _rank_statistics(queries, gallery, query_codes, gallery_codes, chunk_size)
    metrics = {f"R@{k}": float((ranks <= k).to(torch.float64).mean()) for k in ks}
    metrics["median_rank"] = float(np.median(ranks.numpy()))
    metrics["mAP"] = float(precisions.mean())
    metrics["queries"] = int(ranks.numel())
    return metrics


def _check_embeddings(query_emb: Tensor, gallery_emb: Tensor) -> tuple[Tensor, Tensor]:
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"query_emb {tuple(query_emb.shape)} and gallery_emb {tuple(gallery_emb.shape)} "
            "must be [N, d] matrices with the same d"
        )
    return query_emb.detach().float().cpu(), gallery_emb.detach().float().cpu()


def retrieval_metrics(
    query_emb: Tensor,
    gallery_emb: Tensor,
    query_ids: Sequence[Any] | Tensor | None = None,
    gallery_ids: Sequence[Any] | Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@k, median rank and mAP in both directions (``q2g/...`` and ``g2q/...``).

    Scores are inner products (cosine similarities for normalized embeddings). Ids may be
    any hashable values (keys, class labels); rows without a relevant item on the other side
    are left out of that direction, and ``q2g/queries`` / ``g2q/queries`` count the rows used.

    Example:
        >>> import torch
        >>> q = torch.eye(3)
        >>> g = torch.eye(3)[[0, 0, 1, 2]]
        >>> retrieval_metrics(q, g, query_ids=[0, 1, 2], gallery_ids=[0, 0, 1, 2])["q2g/mAP"]
        1.0
    """
    queries, gallery = _check_embeddings(query_emb, gallery_emb)
    query_codes, gallery_codes = _shared_codes(
        query_ids, gallery_ids, queries.shape[0], gallery.shape[0]
    )
    forward = _one_direction(queries, gallery, query_codes, gallery_codes, ks, chunk_size)
    backward = _one_direction(gallery, queries, gallery_codes, query_codes, ks, chunk_size)
    metrics = {f"q2g/{name}": value for name, value in forward.items()}
    metrics.update({f"g2q/{name}": value for name, value in backward.items()})
    return metrics


def nway_retrieval_metrics(
    embeddings: Mapping[str, Tensor],
    target: str,
    ids: Sequence[Any] | Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Retrieve modality ``target`` from the elementwise product of the other modalities.

    The score of gallery row ``g`` for query row ``q`` is the multilinear inner product
    ``sum_d prod_{m != target} e_m[q, d] * e_target[g, d]`` (Symile's zero-shot rule).
    Returns ``R@k``, ``median_rank``, ``mAP`` and ``queries`` for that one direction.

    Example:
        >>> import torch
        >>> e = {m: torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for m in "abc"}
        >>> sorted(nway_retrieval_metrics(e, target="c", ks=(1,)))
        ['R@1', 'mAP', 'median_rank', 'queries']
    """
    if target not in embeddings:
        raise ValueError(f"target modality {target!r} is not among {sorted(embeddings)}")
    others = [name for name in embeddings if name != target]
    if not others:
        raise ValueError("N-way retrieval needs at least one modality besides the target")
    product = torch.stack([embeddings[name].detach().float().cpu() for name in others]).prod(0)
    queries, gallery = _check_embeddings(product, embeddings[target])
    query_codes, gallery_codes = _shared_codes(ids, ids, queries.shape[0], gallery.shape[0])
    return _one_direction(queries, gallery, query_codes, gallery_codes, ks, chunk_size)


NWAY_QUERY = "*"
"""The query name of N-way results (``("*", target)``: the target from all the others)."""


def pairwise_recall(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str]],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    labels: Tensor | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """Retrieval of ``gallery`` from ``query`` for each ``(query, gallery)`` of ``pairs``.

    Instance level (``labels`` is ``None``): over the rows that have both modalities, row
    ``i`` of one matches row ``i`` of the other. Class level (``labels``, ``LongTensor[N]``
    with -1 for no label): the queries are the labelled rows with the query modality, the
    gallery the labelled rows with the gallery modality, and a hit is any gallery item of the
    query's class. ``present`` maps each modality to ``BoolTensor[N]``. Returns
    ``{(query, gallery): {R@k, median_rank, mAP, queries}}``; pairs with fewer than two
    usable rows (or, at class level, no class on both sides) are left out.

    Example:
        >>> e = {"a": torch.eye(3), "b": torch.eye(3)}
        >>> p = {"a": torch.tensor([True, True, False]), "b": torch.ones(3, dtype=torch.bool)}
        >>> pairwise_recall(e, p, [("a", "b")], ks=(1,))[("a", "b")]["queries"]
        2
        >>> by_class = pairwise_recall(e, p, [("a", "b")], ks=(1,), labels=torch.tensor([0, 0, 1]))
        >>> by_class[("a", "b")]["R@1"], by_class[("a", "b")]["queries"]
        (1.0, 2)
    """
    results = {}
    for query, gallery in pairs:
        if labels is None:
            query_rows = gallery_rows = present[query] & present[gallery]
            query_ids = gallery_ids = None
        else:
            query_rows, gallery_rows = (
                present[query] & (labels >= 0),
                present[gallery] & (labels >= 0),
            )
            query_ids, gallery_ids = labels[query_rows], labels[gallery_rows]
            if not set(query_ids.tolist()) & set(gallery_ids.tolist()):
                continue
        if int(query_rows.sum()) < 2 or int(gallery_rows.sum()) < 2:
            continue
        queries, candidates = _check_embeddings(
            embeddings[query][query_rows], embeddings[gallery][gallery_rows]
        )
        codes = _shared_codes(query_ids, gallery_ids, queries.shape[0], candidates.shape[0])
        results[(query, gallery)] = _one_direction(queries, candidates, *codes, ks, chunk_size)
    return results


def nway_recall(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    labels: Tensor | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """Each modality retrieved from the product of all the others
    (:func:`nway_retrieval_metrics`), over the rows that have every modality; with
    ``labels`` (-1: none) at class level, over those rows that have a label too.

    Returns ``{("*", target): {R@k, median_rank, mAP, queries}}``; empty with fewer than two
    modalities or fewer than two usable rows.

    Example:
        >>> e = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for m in "abc"}
        >>> p = {m: torch.ones(4, dtype=torch.bool) for m in "abc"}
        >>> sorted(nway_recall(e, p, ks=(1,)))
        [('*', 'a'), ('*', 'b'), ('*', 'c')]
    """
    names = list(embeddings)
    if len(names) < 2:
        return {}
    complete = torch.stack([present[name] for name in names]).all(dim=0)
    if labels is not None:
        complete &= labels >= 0
    if int(complete.sum()) < 2:
        return {}
    rows = {name: embeddings[name][complete] for name in names}
    ids = None if labels is None else labels[complete]
    return {
        (NWAY_QUERY, target): nway_retrieval_metrics(
            rows, target, ids=ids, ks=ks, chunk_size=chunk_size
        )
        for target in names
    }


def recall_curve(
    query_emb: Tensor,
    gallery_emb: Tensor,
    max_k: int = 50,
    chunk_size: int | None = None,
    query_ids: Sequence[Any] | Tensor | None = None,
    gallery_ids: Sequence[Any] | Tensor | None = None,
) -> Tensor:
    """Recall@k for k = 1..max_k; row i of the queries matches row i of the gallery, or,
    with ids, the gallery items of equal id (class level).

    Example:
        >>> import torch
        >>> recall_curve(torch.eye(4), torch.eye(4), max_k=2).tolist()
        [1.0, 1.0]
    """
    queries, gallery = _check_embeddings(query_emb, gallery_emb)
    codes = _shared_codes(query_ids, gallery_ids, queries.shape[0], gallery.shape[0])
    ranks, _ = _rank_statistics(queries, gallery, *codes, chunk_size)
    ks = torch.arange(1, max_k + 1, dtype=torch.float64)
    return (ranks[None, :] <= ks[:, None]).to(torch.float64).mean(dim=1)
