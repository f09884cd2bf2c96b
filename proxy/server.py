"""The asyncio layer: listeners, one upstream connection per client, byte moving and backpressure.

Everything protocol-related lives in :mod:`proxy.session`; this module only connects sockets to a
Session and applies flow control in both directions: when one side's write buffer is full, reading
from the other side pauses until it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from typing import Any

from .config import Listen, Upstream
from .health import Health
from .metrics import Stats
from .session import Session

log = logging.getLogger("respmeter")

# pause reasons for reading from the client
P_UPSTREAM_FULL = 1  # upstream write buffer above its high-water mark
P_BACKLOG = 2  # too many commands in flight for this connection
P_SHUTDOWN = 4
# pause reasons for reading from the upstream
P_CLIENT_FULL = 1

WRITE_HIGH = 1024 * 1024  # transport write buffer high-water mark, both sides
MAX_BACKLOG = 20_000  # commands held per connection (Session.backlog) before reading from it pauses


class ProxySettings:
    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout: float = 5.0,
        max_bulk: int | None = None,
        max_query: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        handshake: Callable[[Session], list] | None = None,
        policy: Any = None,
        downstream_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.max_bulk = max_bulk
        self.max_query = max_query
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.handshake = handshake
        self.policy = policy
        self.downstream_ssl = downstream_ssl


def classify_connect_error(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(metric kind, human reason) for a failed upstream connect. Never includes credentials."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "connect_timeout", f"connect timed out after {timeout:g}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls", f"upstream TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return "tls", f"upstream TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused", "connection refused"
    if isinstance(exc, OSError):
        return "connect_error", exc.strerror or type(exc).__name__
    return "connect_error", type(exc).__name__


class ClientConnection(asyncio.Protocol):
    """A client connection and, through its Session, its upstream connection."""

    __slots__ = (
        "proxy",
        "listen",
        "transport",
        "upstream",
        "session",
        "paused",
        "up_paused",
        "connect_task",
    )

    def __init__(self, proxy: "Proxy", listen: Listen) -> None:
        self.proxy = proxy
        self.listen = listen
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.paused = 0
        self.up_paused = 0
        self.connect_task: asyncio.Task | None = None

    # client side ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        proxy = self.proxy
        s = proxy.settings
        self.session = Session(
            proxy.stats,
            transport.write,
            self._close_client,
            listener=self.listen.name,
            peer=str(peer),
            max_bulk=s.max_bulk,
            max_query=s.max_query,
            policy=s.policy,
        )
        proxy.stats.client_connections += 1
        proxy.stats.connections_total += 1
        proxy.connections.add(self)
        self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        proxy = self.proxy
        s = proxy.settings
        u = s.upstream
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            if u.path:
                coro = loop.create_unix_connection(lambda: UpstreamConnection(self), u.path)
            else:
                coro = loop.create_connection(
                    lambda: UpstreamConnection(self),
                    u.host,
                    u.port,
                    ssl=s.ssl_context,
                    server_hostname=(s.server_hostname or u.host) if s.ssl_context else None,
                )
            transport, _ = await asyncio.wait_for(coro, s.connect_timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a client-visible error
            kind, reason = classify_connect_error(exc, s.connect_timeout)
            proxy.stats.upstream_error(kind)
            proxy.health.failed(reason)
            log.warning("upstream %s unavailable: %s", u.address(), reason)
            if self.session is not None and not self.session.closed:
                self.session.upstream_failed(reason)
            return
        proxy.health.ok()
        proxy.connect_seconds = time.monotonic() - t0
        if self.session is None or self.session.closed:
            transport.close()
            return
        self.upstream = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        handshake = s.handshake(self.session) if s.handshake else ()
        self.session.upstream_connected(transport.write, transport.close, handshake)  # type: ignore[attr-defined]
        if self.up_paused:
            transport.pause_reading()  # type: ignore[attr-defined]
        self._check_backlog()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        session.client_data(data)
        if session.backlog > MAX_BACKLOG:
            self.pause(P_BACKLOG)

    def eof_received(self) -> bool:
        # As Redis does: a client that closes its side is gone (replies in flight are dropped, a
        # blocked command is abandoned), so its upstream connection closes too.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        proxy = self.proxy
        proxy.stats.client_connections -= 1
        proxy.connections.discard(self)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.session is not None and not self.session.closed:
            self.session.client_closed()
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:  # the client is slow to read replies
        self.up_paused |= P_CLIENT_FULL
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.up_paused &= ~P_CLIENT_FULL
        if not self.up_paused and self.upstream is not None:
            self.upstream.resume_reading()

    # flow control ------------------------------------------------------------------------------
    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _check_backlog(self) -> None:
        if self.paused & P_BACKLOG and self.session is not None and self.session.backlog < MAX_BACKLOG // 2:
            self.resume(P_BACKLOG)

    def _close_client(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        self._close_client()


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("client",)

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c.session is not None:
            c.session.upstream_data(data)
            if c.paused & P_BACKLOG:
                c._check_backlog()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.client
        session = c.session
        if session is None or session.closed:
            return
        proxy = c.proxy
        tls = proxy.settings.ssl_context is not None
        if exc is None:
            reason, kind = "upstream closed the connection", "eof"
        elif isinstance(exc, ssl.SSLError):
            reason, kind = f"upstream TLS: {exc.reason or exc}", "tls"
        else:
            reason, kind = f"upstream connection lost: {exc}", "reset"
        if not session.got_reply and tls and kind != "tls":
            # closed or reset right after the handshake, before any reply: TLS 1.3 servers do this
            # when they require a client certificate and got none (or a wrong one)
            reason = ("upstream TLS: the server dropped the connection after the handshake (does it "
                      f"require a client certificate?): {exc or 'closed'}")
            kind = "tls"
        proxy.stats.upstream_error(kind)
        if exc is not None or kind == "tls":
            proxy.health.failed(reason)
        log.debug("client %s: %s", session.peer, reason)
        if not session.got_reply:
            # it broke before saying anything: the commands sent get a clear error, not a bare close
            session.upstream_failed(reason)
            c.upstream = None
            return
        session.upstream_lost(reason)

    def pause_writing(self) -> None:  # upstream is slow to take our writes
        self.client.pause(P_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.client.resume(P_UPSTREAM_FULL)


class Proxy:
    def __init__(self, settings: ProxySettings, listens: list[Listen], stats: Stats, health: Health) -> None:
        self.settings = settings
        self.listens = listens
        self.stats = stats
        self.health = health
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.connect_seconds = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listen in self.listens:
            factory = self._factory(listen)
            ssl_ctx = self.settings.downstream_ssl
            if listen.path:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(listen.path).st_mode):
                        os.unlink(listen.path)
                server = await loop.create_unix_server(factory, listen.path, ssl=ssl_ctx)
            else:
                server = await loop.create_server(
                    factory, listen.host, listen.port, ssl=ssl_ctx, reuse_address=True, backlog=1024
                )
            self.servers.append(server)
            log.info("listening on %s", listen)

    def _factory(self, listen: Listen) -> Callable[[], ClientConnection]:
        return lambda: ClientConnection(self, listen)

    def bound_ports(self) -> list[int]:
        ports = []
        for server in self.servers:
            for sock in server.sockets or ():
                name = sock.getsockname()
                if isinstance(name, tuple):
                    ports.append(name[1])
        return ports

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let replies in flight arrive (up to ``timeout``), then close everything."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.pause(P_SHUTDOWN)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [c for c in self.connections if c.session is not None and not c.session.idle]
            if not busy:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        for listen in self.listens:
            if listen.path:
                with contextlib.suppress(OSError):
                    os.unlink(listen.path)
        await asyncio.sleep(0)
