"""The ASGI app of ``mmalign serve`` (FastAPI): the routes of :mod:`mmalign.serve.api`,
:mod:`mmalign.serve.compat` and :mod:`mmalign.serve.page`, ``/healthz`` and Prometheus
``/metrics``, with the cross-cutting rules of the service:

- the model and indexes are loaded once (a :class:`~mmalign.serve.catalog.Catalog`) and the
  towers are shared through one :class:`~mmalign.serve.batcher.DynamicBatcher`;
- with a ``token``, every route but the page, its files and ``/healthz`` needs
  ``Authorization: Bearer TOKEN`` (or ``?token=TOKEN``, for the page's images and players);
- a body over :data:`MAX_BODY_BYTES`, or a POST without ``Content-Length``, is refused
  before it is read;
- every error is JSON (:mod:`mmalign.serve.problems`).

Example:
    >>> app = create_app(load_catalog(["emb"], None), token="s3cret")  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmalign.serve import api, compat, page
from mmalign.serve.batcher import MAX_BATCH, MAX_WAIT_S, DynamicBatcher
from mmalign.serve.catalog import Catalog
from mmalign.serve.metrics import ServiceMetrics
from mmalign.serve.problems import RequestError, install_handlers

MAX_BODY_BYTES = 12 << 20
"""Largest request body (12 MiB: an 8 MiB file in base64, with room for the rest)."""
PUBLIC = ("/", "/healthz", "/static/")
"""Routes open without the token (prefixes for ``/static/``)."""


def _public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


def _body_problem(request: Request) -> RequestError | None:
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return RequestError("Content-Length", "a body needs a Content-Length", "", 411)
    if int(length) > MAX_BODY_BYTES:
        return RequestError(
            "body", f"the body is over {MAX_BODY_BYTES:,} bytes", "send smaller files", 413
        )
    return None


def _token_problem(request: Request, token: str | None) -> RequestError | None:
    if token is None or _public(request.url.path):
        return None
    header = request.headers.get("authorization", "")
    given = (
        header[7:]
        if header.lower().startswith("bearer ")
        else request.query_params.get("token", "")
    )
    if not secrets.compare_digest(given.encode(), token.encode()):
        return RequestError("Authorization", "missing or wrong token", "send Bearer TOKEN", 401)
    return None


class GuardAndMeasure:
    """ASGI middleware: refuse an oversized or unauthorized request before it is read, and
    count every answer and its latency by route. Plain ASGI (no per-request task and
    streams, as ``@app.middleware("http")`` would add)."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServiceMetrics) -> None:
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        request = Request(scope)
        problem = _body_problem(request) or _token_problem(request, self.token)
        try:
            if problem is not None:
                answer = JSONResponse(problem.payload(), status_code=problem.status)
                await answer(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(name, status, time.perf_counter() - started)


def create_app(
    catalog: Catalog,
    *,
    token: str | None = None,
    max_batch: int = MAX_BATCH,
    max_wait_s: float = MAX_WAIT_S,
) -> FastAPI:
    """The service over a loaded catalog (see the module docstring); ``max_batch`` and
    ``max_wait_s`` are the dynamic batcher's.

    Example:
        >>> app = create_app(catalog, max_batch=1)  # doctest: +SKIP
    """
    metrics = ServiceMetrics()
    batcher = DynamicBatcher(
        catalog.model,
        max_batch=max_batch,
        max_wait_s=max_wait_s,
        on_batch=metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mmalign serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.catalog, app.state.batcher, app.state.metrics = catalog, batcher, metrics
    install_handlers(app)

    app.add_middleware(GuardAndMeasure, token=token, metrics=metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    for router in (api.router, compat.router, page.router):
        app.include_router(router)
    return app
