"""The socket ``mmalign serve`` listens on gives accepted connections ``TCP_NODELAY`` (as
uvicorn's asyncio server sets it), so a kept-alive client does not wait for a delayed ACK."""

from __future__ import annotations

import asyncio
import socket

from mmalign.cli.serve import _listening_socket


def test_accepted_connections_have_tcp_nodelay() -> None:
    async def accepted_nodelay() -> int:
        sock = _listening_socket("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Probe, sock=sock)  # what uvicorn does with sockets=
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
