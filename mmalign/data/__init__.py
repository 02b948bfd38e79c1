"""WebDataset pipeline: shards, per-extension decoding, presence masks, batching; and the
other data source, a finished embedding export (:mod:`mmalign.data.exports`).

Example:
    >>> from mmalign.data import make_loader, iterate_records  # doctest: +SKIP
"""

from mmalign.data.decode import RecordError, decode_value
from mmalign.data.exports import ExportError, load_embeddings, read_manifest
from mmalign.data.loader import Loader, NoUsableData, loader_from_config, make_loader
from mmalign.data.records import iterate_records
from mmalign.data.shards import expand_shards

__all__ = [
    "ExportError",
    "Loader",
    "NoUsableData",
    "RecordError",
    "decode_value",
    "expand_shards",
    "iterate_records",
    "load_embeddings",
    "loader_from_config",
    "make_loader",
    "read_manifest",
]
