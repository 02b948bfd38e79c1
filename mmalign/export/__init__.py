"""Embeddings to files, a FAISS nearest-neighbour index, and search. A finished export is
read back by :mod:`mmalign.data.exports` (:func:`~mmalign.data.exports.load_embeddings`).

- :mod:`~mmalign.export.writer`: the chunked, resumable, multi-rank export
  (:func:`export_embeddings`, :func:`run_export` for ``mmalign export``).
- :mod:`~mmalign.export.index`: FAISS indexes (:func:`build_index`, :func:`load_index`).
- :mod:`~mmalign.export.search`: encode a query and find its nearest rows (:func:`search`).

Example:
    >>> from mmalign.export import build_index, export_embeddings, search
    >>> export_embeddings("runs/digits", "data/digits/test-000000.tar", ["image", "text"],
    ...                   "emb")["rows"]  # doctest: +SKIP
    180
    >>> build_index("emb", "image", kind="hnsw")  # doctest: +SKIP
    PosixPath('emb/index/image.faiss')
    >>> search("emb", None, "the digit seven", "text", k=3)[0]["key"]  # doctest: +SKIP
    'test-000123'
"""

from mmalign.export.index import EmbeddingIndex, build_index, load_index
from mmalign.export.search import search
from mmalign.export.writer import (
    export_embeddings,
    merge_manifests,
    model_fingerprint,
    run_export,
)

__all__ = [
    "EmbeddingIndex",
    "build_index",
    "export_embeddings",
    "load_index",
    "merge_manifests",
    "model_fingerprint",
    "run_export",
    "search",
]
