"""``mmalign serve EXPORT [EXPORT ...] [--model DIR] [--host 127.0.0.1] [--port 8000]
[--token TOKEN]``: serve exported indexes over HTTP (:mod:`mmalign.serve`): clip-retrieval's
``/knn-service``, ``/search``, a search page at ``/``, ``/metrics``. The model and indexes
are loaded once; the URL is printed when the service listens; SIGTERM or Ctrl-C stop it
gracefully (requests in flight finish).

Example:
    >>> from mmalign.cli.main import main
    >>> main(["serve", "emb", "--port", "8000"])  # doctest: +SKIP
    mmalign serve: http://127.0.0.1:8000/ (indexes: emb)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket

from mmalign.cli.common import bounded, check_model, check_path, positive_int

HELP = "serve exported indexes over HTTP, with a search page"
TOKEN_VARIABLE = "MMALIGN_SERVE_TOKEN"
"""Environment variable read for the token when ``--token`` is not given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The exports, the model, where to listen, the token and the batching."""
    parser.add_argument("exports", nargs="+", metavar="EXPORT", help="export dir, or NAME=DIR")
    parser.add_argument("--model", help="model or run directory (default: the exported one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument(
        "--port", type=bounded(int, 0, 65535), default=8000, help="port (0: any free port)"
    )
    parser.add_argument(
        "--token", help=f"require Authorization: Bearer TOKEN (default: ${TOKEN_VARIABLE})"
    )
    parser.add_argument(
        "--max-batch", type=positive_int, default=32, help="samples per forward pass (1: none)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=bounded(float, 0),
        default=2.0,
        help="wait for more samples after the first",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads of a forward pass (default: torch's; 1 on a busy shared CPU)",
    )


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket. Its protocol is named (``IPPROTO_TCP``, not 0): asyncio sets
    ``TCP_NODELAY`` only on accepted sockets that say so, and without it a kept-alive
    connection waits for the client's delayed ACK (about 40 ms) between a response's headers
    and its body."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        from mmalign.errors import UserError

        raise UserError(
            f"cannot listen on {host}:{port}: {error.strerror} (--host/--port); pick another "
            "port, or --port 0 for any free one"
        ) from None
    return sock


def run(args: argparse.Namespace) -> int:
    """Load the catalog, bind, print the URL, serve until SIGTERM/SIGINT."""
    try:
        import uvicorn

        from mmalign.serve.app import create_app
        from mmalign.serve.catalog import load_catalog
    except ImportError:
        from mmalign.extras import missing_extra

        raise missing_extra("serve", "mmalign serve") from None
    for spec in args.exports:
        check_path(spec.partition("=")[2] or spec, "EXPORT", kind="directory")
    if args.model is not None:
        check_model(args.model, "--model")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    catalog = load_catalog(args.exports, args.model)
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    app = create_app(
        catalog, token=token, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000
    )
    sock = _listening_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"mmalign serve: http://{shown}:{port}/ (indexes: {', '.join(catalog.exports)})", flush=True
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    stopped_by: list[int] = []
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handlers it found: these record it, so the command ends with status 0, not the signal.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda received, frame: stopped_by.append(received))
    server.run(sockets=[sock])
    names = ", ".join(signal.Signals(number).name for number in stopped_by) or "shut down"
    print(f"mmalign serve: stopped ({names})", flush=True)
    return 0
