"""A zero-work forwarder: the ceiling of the proxy's architecture in Python.

One upstream connection per client connection, uvloop, TCP_NODELAY, bytes passed through with no
parsing, counting or policy. ``proxy_bench.py --with-forwarder`` runs it beside respmeter so the
cost of respmeter's own work can be told from the cost of a Python event loop moving the bytes.

    python bench/forwarder.py LISTEN_PORT UPSTREAM_PORT   (loopback only)
"""

from __future__ import annotations

import asyncio
import socket
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    upstream_port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []
        nodelay(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        nodelay(up)
        self.upstream = up  # type: ignore[assignment]
        for data in self.early:
            up.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(listen: int, upstream: int) -> None:
    Client.upstream_port = upstream
    await asyncio.get_running_loop().create_server(Client, "127.0.0.1", listen)
    await asyncio.Event().wait()


def serve(main) -> None:  # noqa: ANN001
    """Run ``main(LISTEN_PORT, UPSTREAM_PORT)`` from the command line, on uvloop when installed."""
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    (uvloop.run if uvloop is not None else asyncio.run)(main(listen_port, upstream_port))


if __name__ == "__main__":
    serve(main)
