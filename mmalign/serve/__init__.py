"""``mmalign serve``: retrieval over exported indexes as an HTTP service (FastAPI, uvicorn),
speaking clip-retrieval's API and its own, with a search page. One concept per module:

- :mod:`~mmalign.serve.catalog`: the model and exports, loaded once (indexes, Matryoshka
  prefixes, metadata, kept items);
- :mod:`~mmalign.serve.batcher`: dynamic batching of the towers' forward passes;
- :mod:`~mmalign.serve.uploads`: query values (base64 files, text, lists) to raw samples,
  under the upload cap and the per-record limits of training;
- :mod:`~mmalign.serve.service`: one search, as ``mmalign search`` scores it;
- :mod:`~mmalign.serve.api`: ``/search``, ``/items/...``, ``/indexes``;
- :mod:`~mmalign.serve.compat`: clip-retrieval's ``/knn-service``, ``/indices-list``,
  ``/metadata``;
- :mod:`~mmalign.serve.page`: the search page at ``/`` (``static/``);
- :mod:`~mmalign.serve.metrics`: Prometheus ``/metrics``;
- :mod:`~mmalign.serve.problems`: every error as a 4xx JSON body naming the field;
- :mod:`~mmalign.serve.app`: the app (token, body limit, routes).

The package needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).

Example:
    >>> from mmalign.serve.app import create_app  # doctest: +SKIP
    >>> from mmalign.serve.catalog import load_catalog  # doctest: +SKIP
    >>> app = create_app(load_catalog(["emb"], None))  # doctest: +SKIP
"""
