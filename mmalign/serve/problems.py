"""The errors of a request, as JSON: every refusal is a 4xx response
``{"detail": "<what> (<field>); <what to do>", "field": "<field>"}``, never a traceback.

:class:`RequestError` is what the service raises for a bad request; :func:`install_handlers`
turns it, FastAPI's validation errors (malformed JSON, a wrong type, ``k`` out of range) and
anything unexpected (a 500 without a traceback, logged) into that shape.

Example:
    >>> error = RequestError("k", "k must be at least 1, got 0", "pass 1 to 1000")
    >>> error.status, error.payload()
    (422, {'detail': 'k must be at least 1, got 0 (k); pass 1 to 1000', 'field': 'k'})
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

LOG = logging.getLogger("mmalign.serve")


class RequestError(Exception):
    """A request the service refuses: the ``field`` at fault, what is wrong, what to do,
    and the HTTP ``status`` (422 by default: the request is well-formed but unusable)."""

    def __init__(self, field: str, what: str, todo: str = "", status: int = 422) -> None:
        super().__init__(what)
        self.field, self.what, self.todo, self.status = field, what, todo, status

    def payload(self) -> dict[str, str]:
        """The JSON body of the response."""
        todo = f"; {self.todo}" if self.todo else ""
        return {"detail": f"{self.what} ({self.field}){todo}", "field": self.field}


def _location(loc: tuple[Any, ...]) -> str:
    """``("body", "query", "text")`` -> ``query.text`` (``body`` for the whole body)."""
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "body"


def validation_problem(error: RequestValidationError) -> RequestError:
    """The first of FastAPI's validation errors as a :class:`RequestError` (400 for a body
    that is not JSON, else 422).

    Example:
        >>> validation_problem(RequestValidationError(
        ...     [{"loc": ("body", "k"), "msg": "Input should be >= 1", "type": "x"}])).payload()
        {'detail': 'Input should be >= 1 (k); see the API in docs/serving.md', 'field': 'k'}
    """
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return RequestError("body", "the body is not valid JSON", "send a JSON object", 400)
    return RequestError(
        _location(tuple(first.get("loc", ()))), first["msg"], "see the API in docs/serving.md"
    )


def _json(error: RequestError) -> JSONResponse:
    return JSONResponse(error.payload(), status_code=error.status)


def install_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the JSON shape of this module."""

    async def refused(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestError)
        return _json(error)

    async def invalid(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return _json(validation_problem(error))

    async def http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        what = "no such route" if error.status_code == 404 else str(error.detail)
        return _json(RequestError("path", what, "see docs/serving.md", error.status_code))

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        LOG.exception("internal error answering %s", request.url.path)
        problem = RequestError("server", "internal error", "see the server's log", 500)
        return _json(problem)

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, unexpected)
