"""A zero-work pooled forwarder: the ceiling of respmeter's pool (``--upstream-pool 1``) in Python.

Every client's requests go over one shared upstream connection, batched per event-loop turn, and
the replies are cut at frame boundaries and handed back in order, as respmeter's pool does, with
the same C framing (``proxy._speedups``), but with no counting, policy, pinning or handshake: what
is left is the event loop, the system calls and the routing. ``proxy_bench.py --with-forwarder``
runs it beside the pool so that the pool's own work can be told from the cost of the design.

It is a benchmark tool only: it assumes what ``redis-benchmark`` sends (complete RESP requests, no
blocking commands, no pub/sub, nothing connection-specific).

    python bench/pool_forwarder.py LISTEN_PORT UPSTREAM_PORT   (loopback only)
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forwarder import nodelay, serve  # noqa: E402

from proxy import resp  # noqa: E402  (its C framing: this tool measures the design with it)

if resp._speedups is None:
    sys.exit("pool_forwarder: proxy._speedups is not built (pip install -e . with a C compiler)")
SCAN = resp._speedups.scan
NAMES: dict = {}  # (no command is "plain" to the scanner: each is one item, counted by ``framed``)


class Shared(asyncio.Protocol):
    """The one upstream connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.routes: deque[list] = deque()  # [client, replies left]
        self.out: list[bytes] = []
        self.scheduled = False
        self.solo = True  # the last batch had one client's requests: write at once when idle
        self.framer = resp.ReplyFramer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        nodelay(transport)

    def send(self, client: "Client", data: bytes, n: int) -> None:
        routes = self.routes
        idle = not routes and not self.out
        if routes and routes[-1][0] is client:
            routes[-1][1] += n
        else:
            routes.append([client, n])
        if idle and self.solo:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        self.out.append(data)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        out, self.out = self.out, []
        self.solo = len(out) == 1
        self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        frames = self.framer.feed(data)
        routes = self.routes
        start = i = 0
        nf = len(frames)
        while i < nf:
            head = routes[0]
            k = head[1]
            take = k if k <= nf - i else nf - i
            i += take
            end = frames[i - 1][0]
            if take == k:
                routes.popleft()
            else:
                head[1] = k - take
            head[0].transport.write(data[start:end] if start or end != len(data) else data)
            start = end
        if start < len(data):
            routes[0][0].transport.write(data[start:])


class Client(asyncio.Protocol):
    shared: Shared

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        _items, end, _need, framed = SCAN(buf, 0, 1 << 30, NAMES, None)
        self.buf = buf[end:]
        if framed:
            self.shared.send(self, buf[:end] if end < len(buf) else buf, framed)


async def main(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    _, Client.shared = await loop.create_connection(Shared, "127.0.0.1", upstream)
    await loop.create_server(Client, "127.0.0.1", listen)
    await asyncio.Event().wait()


if __name__ == "__main__":
    serve(main)
