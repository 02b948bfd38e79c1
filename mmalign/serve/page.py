"""The search page at ``/``: static HTML, CSS and JavaScript shipped as package data
(``mmalign/serve/static/``). The page asks ``/indexes`` what is served, sends ``/search``
and shows the results as a grid of cards (a thumbnail for an image, a player for audio, the
text, the metadata, the score).

Example:
    >>> static_file("index.html").startswith("<!doctype html>")
    True
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from mmalign.serve.problems import RequestError

STATIC_FILES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
"""The page's files and their media types (nothing else is served from the package)."""

router = APIRouter()


def static_file(name: str) -> str:
    """The text of one of the page's files."""
    return (files("mmalign.serve") / "static" / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The search page."""
    return HTMLResponse(static_file("index.html"))


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """One of the page's files, by name (no paths)."""
    if name not in STATIC_FILES:
        raise RequestError("name", f"no page file {name!r}", f"one of {list(STATIC_FILES)}", 404)
    return Response(static_file(name), media_type=STATIC_FILES[name])
