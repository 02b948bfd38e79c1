"""Searching an index: encode a raw query (one modality, or several composed) with the
model, return the best-scoring rows.

The query is an already parsed sample (a string for text, a path or image for images, a list
of numbers for tabular towers...) of a real modality of the model; turning command-line
strings into samples is the command line's job (``mmalign search``).

Example:
    >>> rows = search("emb", None, "the digit seven", "text", k=3, target="image")  # doctest: +SKIP
    >>> rows[0]["key"]  # doctest: +SKIP
    'test-000123'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmalign.data.decode import FILE_KINDS, RecordError, decode_file
from mmalign.data.exports import read_manifest
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.errors import UserError
from mmalign.eval.loading import load_model
from mmalign.export.index import load_index
from mmalign.export.writer import model_fingerprint

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel


class QueryError(UserError, ValueError):
    """A query this model or index cannot score (unknown modality, weights a Symile model
    cannot use, nothing to search with).

    Example:
        >>> isinstance(QueryError("no query"), ValueError)
        True
    """


def recorded_model(index_dir: str | Path) -> str:
    """The model or run directory an export recorded (to encode queries against it).

    Example:
        >>> recorded_model("emb")  # doctest: +SKIP
        'runs/digits/model'
    """
    model = read_manifest(index_dir)["settings"].get("model_path")
    if model is None:
        raise ValueError(
            f"{index_dir} was exported from an in-memory model; pass the model to search "
            "(--model on the command line)"
        )
    return model


def check_query(
    model: AlignmentModel, queries: Mapping[str, Any], weights: Mapping[str, float] | None
) -> dict[str, float]:
    """The per-modality weights of a query this model can score (default 1 each), or a
    :class:`QueryError`: no query, a modality the model lacks, weights for a Symile model or
    for a modality that is not queried, a weight that is not finite, every weight 0.
    Negative weights are allowed (query arithmetic, :func:`query_vector`).

    Example:
        >>> check_query(model, {"text": "three"}, None)  # doctest: +SKIP
        {'text': 1.0}
    """
    if not queries:
        raise QueryError("a search needs at least one query modality")
    unknown = sorted(set(queries) - set(model.modalities))
    if unknown:
        raise QueryError(
            f"the model has no modality {', '.join(map(repr, unknown))}; "
            f"modalities: {list(model.modalities)}"
        )
    weights = dict(weights or {})
    if weights and model.objective.scores_jointly:
        raise QueryError(
            "query weights apply to pairwise models (clip, anchored, sigmoid); this model "
            "scores the product of the query modalities (Symile), where a weight changes no rank"
        )
    bad = {name: value for name, value in weights.items() if not math.isfinite(value)}
    if bad:
        raise QueryError(
            f"query weights must be finite numbers, got {bad} (--weights); pass e.g. text=0.5"
        )
    extra = sorted(set(weights) - set(queries))
    if extra:
        raise QueryError(f"weights name {extra}, which are not query modalities {list(queries)}")
    checked = {name: float(weights.get(name, 1.0)) for name in queries}
    if not any(checked.values()):
        raise QueryError(
            f"every query weight is 0, got {checked} (--weights): every candidate would score "
            "0; give one modality a non-zero weight"
        )
    return checked


def combine_query(
    model: AlignmentModel, embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> torch.Tensor:
    """The query vector of already encoded query embeddings (``[1, dim]`` or ``[dim]`` each,
    one per modality): each scaled by its weight, then combined by the objective's own score
    read off against the identity (see :func:`query_vector`).

    Example:
        >>> combine_query(model, {"text": text_row}, {"text": 1.0}).shape  # doctest: +SKIP
        torch.Size([128])
    """
    scaled = {
        name: vector.float().cpu().reshape(1, -1) * weights[name]
        for name, vector in embeddings.items()
    }
    width = next(iter(scaled.values())).shape[1]
    return model.objective.score(scaled, torch.eye(width))[0]


LIMIT_REASONS = ("member_too_large", "too_large", "too_long", "bad_sample_rate")
"""The reasons of a query file refused by a per-record limit (not by its content)."""


def _query_file_advice(reason: str, kind: str) -> str:
    if reason in LIMIT_REASONS:
        return "pass a smaller file (the limits of records apply to queries)"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"pass a file {article} {kind} tower reads (.{', .'.join(FILE_KINDS[kind][:3])} ...)"


def read_query_file(
    name: str,
    path: str | Path,
    kind: str,
    limits: RecordLimits = DEFAULT_LIMITS,
    flag: str | None = None,
) -> Any:
    """The query file ``path`` of modality ``name`` decoded as a record's file of a ``kind``
    tower is (:func:`~mmalign.data.decode.decode_file`: the tower type's decoder for the
    file's extension, the per-record ``limits`` checked from its size and header before
    decoding); a file over a limit or that does not decode is a :class:`QueryError` (naming
    ``flag`` when given).

    Example:
        >>> read_query_file("photo", "big.png", "image", flag="--image")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        mmalign.export.search.QueryError: the 'photo' query big.png is refused (too_large): ...
    """
    try:
        return decode_file(path, kind, limits)
    except RecordError as error:
        where = f" ({flag})" if flag else ""
        raise QueryError(
            f"the {name!r} query {path} is refused ({error.reason}): {error.detail}{where}; "
            + _query_file_advice(error.reason, kind)
        ) from None


def read_query_files(
    model: AlignmentModel, queries: Mapping[str, Any], limits: RecordLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """``queries`` with each path given to an image, audio, video, time-series or graph tower
    decoded by :func:`read_query_file`.

    Example:
        >>> read_query_files(model, {"audio": "hour.flac"})  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        mmalign.export.search.QueryError: the 'audio' query hour.flac is refused (too_long): ...
    """
    decoded = dict(queries)
    for name, raw in queries.items():
        kind = model.config.towers[name].type
        if kind in FILE_KINDS and isinstance(raw, str | Path):
            decoded[name] = read_query_file(name, raw, kind, limits)
    return decoded


def query_vector(
    model: AlignmentModel,
    queries: Mapping[str, Any],
    dim: int | None = None,
    weights: Mapping[str, float] | None = None,
    limits: RecordLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """The vector ``v`` with ``<v, c> = model.objective.score(queries, c)`` for every
    candidate ``c``: one raw sample per query modality, encoded (first ``dim`` coordinates,
    renormalized) and combined by the objective's own score, read off against the identity.

    A Symile model gives the elementwise product of the query embeddings (the multilinear
    inner product with the candidate); a pairwise model their sum, each scaled by
    ``weights`` (default 1), so a candidate scores ``sum_m weights[m] * <e_m, c>``. A
    negative weight is query arithmetic: ``{"image": 1, "text": -0.5}`` ranks by "like the
    image, unlike the text" (a single negative weight reverses the ranking). Weights must be
    finite, not all 0, and are refused for a Symile model: a product has no per-modality
    weight (scaling it changes no rank). Query files are read as records are,
    within the per-record ``limits`` (:func:`read_query_files`).

    Example:
        >>> query_vector(model, {"text": "three", "audio": "tone5.wav"}).shape  # doctest: +SKIP
        torch.Size([128])
    """
    checked = check_query(model, queries, weights)
    embeddings = {
        name: _encode_query(model, name, raw, dim)
        for name, raw in read_query_files(model, queries, limits).items()
    }
    return combine_query(model, embeddings, checked)


def _encode_query(model: AlignmentModel, modality: str, raw: Any, dim: int | None) -> torch.Tensor:
    """The embedding of one raw query sample; a sample the tower refuses (a vector of the
    wrong length, a malformed graph) is a :class:`QueryError` naming the query."""
    try:
        return model.encode(modality, [raw], batch_size=1, dim=dim).float().cpu()
    except (ValueError, TypeError) as error:
        raise QueryError(
            f"the {modality} query cannot be used: {error} (--query {modality}=...); pass a "
            "sample of the kind the model was trained on"
        ) from None


def check_export_model(index_dir: str | Path, model: AlignmentModel) -> None:
    """A :class:`QueryError` unless ``model`` is the model whose fingerprint the export
    recorded (its embeddings would not compare with the query's).

    Example:
        >>> check_export_model("emb", load_model("runs/other"))  # doctest: +SKIP
        Traceback (most recent call last):
        QueryError: the model is not the one that made the export emb ...
    """
    settings = read_manifest(index_dir)["settings"]
    recorded = settings.get("model_fingerprint")
    if recorded is None:
        return
    found = model_fingerprint(model)
    if found != recorded:
        raise QueryError(
            f"the model is not the one that made the export {index_dir} (weights fingerprint "
            f"{recorded[:12]} there, {found[:12]} now) (--model); search with "
            f"{settings.get('model_path') or 'the exported model'}, or export again with "
            "this model"
        )


def search(
    index_dir: str | Path,
    model: AlignmentModel,
    query: Any,
    modality: str | None = None,
    k: int = 10,
    *,
    target: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` indexed rows that score best against a query.

    ``query`` is one raw sample of ``modality`` (a modality name of the model, not a tower
    type), or, with ``modality=None``, a composed query: a mapping modality -> raw sample,
    scored by the model's objective (:func:`query_vector`: the multilinear inner product for
    Symile, the ``weights``-weighted sum of similarities for pairwise models). Queries are
    encoded at the index's dim (a truncated export or index: the same renormalized prefix).
    ``target`` is the indexed modality (default: the only one built in ``index_dir``);
    ``model`` is a model, a model/run directory, or ``None`` for the model the export
    recorded. Each row: ``rank``, ``score`` (the objective's score), ``key``, ``present_*``
    and the exported metadata fields.

    Example:
        >>> search("emb", None, "a handwritten seven", "text", k=3)  # doctest: +SKIP
        [{'rank': 1, 'score': 0.83, 'key': 'test-000017', ...}, ...]
        >>> search("emb", None, {"text": "three", "audio": "tone4.wav"}, k=5)  # doctest: +SKIP
    """
    loaded = load_index(index_dir, target)
    model = load_model(recorded_model(index_dir) if model is None else model)
    check_export_model(index_dir, model)
    if modality is not None:
        query = {modality: query}
    elif not isinstance(query, Mapping):
        raise QueryError("give the query's modality, or a composed query {modality: sample, ...}")
    dim = loaded.info["dim"]
    vector = query_vector(model, query, None if dim == model.dim else dim, weights)
    return loaded.search(vector[None], k)[0]
