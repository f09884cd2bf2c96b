"""The asyncio layer: listeners, one upstream connection per client, byte moving and backpressure.

Everything protocol-related lives in :mod:`proxy.session`; this module only connects sockets to a
Session and applies flow control in both directions: when one side's write buffer is full, reading
from the other side pauses until it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
P_BACKLOG = 2  # too many commands (or bytes) held for this connection
P_OUTPUT_FULL = 8  # the client reads none of the replies the proxy answers itself
# pause reasons for reading from the upstream
P_CLIENT_FULL = 1
P_ECHO_FULL = 2  # the upstream takes none of what the proxy writes back from what it reads

DRAIN_QUIET = 0.25  # on shutdown, a client quiet this long with nothing in flight is closed

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
        lazy_upstream: bool = False,
        max_clients: int = 10_000,
        upstream_timeout: float = 10.0,
        keepalive: tuple[int, int, int] | None = (30, 10, 3),
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
        # open a client's upstream connection only once it has authenticated to the proxy
        self.lazy_upstream = lazy_upstream
        self.max_clients = max_clients
        self.upstream_timeout = upstream_timeout  # a reply due for this long: the upstream stalled
        self.keepalive = keepalive  # TCP keepalive of upstream sockets: (idle, interval, count)
        self.pool: Any = None  # proxy.pool.UpstreamPool (--upstream-pool N), or None


MAX_CLIENTS_REPLY = b"-ERR max number of clients reached\r\n"
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
FD_HINT = "(raise ulimit -n / LimitNOFILE, or lower --max-clients)"
OUT_OF_FDS_REPLY = (b"-ERR respmeter: out of file descriptors (too many open files): raise the "
                    b"proxy's limit (ulimit -n, LimitNOFILE) or lower --max-clients\r\n")


def out_of_fds(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUT_OF_FDS


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


async def probe_upstream(settings: ProxySettings) -> str | None:
    """Connect to the upstream (TCP, or TLS with its handshake) and close, sending nothing, so it
    is not billable: None when it accepts, else why not (proxy.health asks this when its evidence
    is stale)."""
    upstream = settings.upstream
    loop = asyncio.get_running_loop()
    lost: asyncio.Future = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(exc)

    try:
        if upstream.path:
            coro = loop.create_unix_connection(Probe, upstream.path)
        else:
            coro = loop.create_connection(
                Probe,
                upstream.host,
                upstream.port,
                ssl=settings.ssl_context,
                server_hostname=(settings.server_hostname or upstream.host) if settings.ssl_context else None,
            )
        transport, _ = await asyncio.wait_for(coro, settings.connect_timeout)
    except Exception as exc:  # noqa: BLE001
        return classify_connect_error(exc, settings.connect_timeout)[1]
    if settings.ssl_context is not None:
        # TLS 1.3 servers refuse a missing or wrong client certificate just after the handshake:
        # give them a moment to say so
        try:
            exc = await asyncio.wait_for(asyncio.shield(lost), 0.25)
        except asyncio.TimeoutError:
            pass
        else:
            return ("upstream TLS: the server dropped the connection after the handshake (does it "
                    f"require a client certificate?): {exc or 'closed'}")
    transport.close()
    return None


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
        "pinned_handshake",
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
        self.pinned_handshake: list | None = None  # proxy.pool: what a client leaving the pool replays

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
        n = len(proxy.connections)
        if n >= s.max_clients or n >= proxy.fd_clients:
            # as Redis does at maxclients: say so, and close (before any upstream work)
            if n >= s.max_clients:
                reason, text, reply = "max_clients", f"--max-clients {s.max_clients} reached", MAX_CLIENTS_REPLY
            else:
                reason, reply = "out_of_fds", OUT_OF_FDS_REPLY
                text = f"out of file descriptors: {proxy.fd_clients} clients fit in the limit {FD_HINT}"
            proxy.stats.refused_connections[reason] += 1
            proxy.note_refusal(reason, text)
            transport.write(reply)
            transport.close()
            return
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
        self.session.wake = self._check_backlog
        self.session.client_buffered = transport.get_write_buffer_size
        if s.pool is not None:
            # on the shared connections, once it has something to send (proxy.pool)
            self.session.request_upstream = s.pool.request(self)
        elif s.lazy_upstream and not self.session.authed:
            self.session.request_upstream = self._start_connect
        else:
            self._start_connect()

    def _start_connect(self) -> None:
        self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        proxy = self.proxy
        s = proxy.settings
        u = s.upstream
        t0 = time.monotonic()
        try:
            transport, _ = await open_upstream(s, lambda: UpstreamConnection(self))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a client-visible error
            if out_of_fds(exc):
                # the proxy's own limit, not the upstream's fault: health stays as it is
                proxy.stats.refused_connections["out_of_fds"] += 1
                proxy.note_refusal("out_of_fds", f"out of file descriptors opening an upstream connection {FD_HINT}")
                if self.session is not None and not self.session.closed:
                    self.session.refuse(OUT_OF_FDS_REPLY)
                return
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
        tune_upstream(transport, s)
        if self.pinned_handshake is not None:
            handshake, self.pinned_handshake = self.pinned_handshake, None
        else:
            handshake = s.handshake(self.session) if s.handshake else ()
        # (a client's end can be passed on over a plain TCP connection: proxy.clientend)
        self.session.end.relay = transport.write_eof if transport.can_write_eof() else None  # type: ignore[attr-defined]
        try:
            self.session.upstream_connected(transport.write, transport.close, handshake)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
            self.internal_error()
            return
        if self.up_paused:
            transport.pause_reading()  # type: ignore[attr-defined]
        self._check_backlog()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        try:
            session.client_data(data)
        except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
            self.internal_error()
            return
        # (Session.backlog > MAX_BACKLOG: its usual terms inlined; the others, which only add, are
        # looked at when they may apply)
        if len(session.waiting) + len(session.pending) + session.queued + (session.waiting_bytes >> 8) > MAX_BACKLOG or (
            (not session.connected or session.held or session.stream.state) and session.backlog > MAX_BACKLOG
        ):
            self.pause(P_BACKLOG)

    def eof_received(self) -> bool:
        # The client closed its sending side (shutdown(SHUT_WR) after a pipeline): like Redis, which
        # runs what it already read and writes the replies before it sees the end, keep the
        # connection until every reply to what was sent is written, then close both sides.
        session = self.session
        if session is None or session.closed:
            return False
        return session.client_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        proxy = self.proxy
        if self.session is None:  # refused in connection_made
            return
        proxy.stats.client_connections -= 1
        proxy.connections.discard(self)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.session is not None and not self.session.closed:
            self.session.client_closed()
        if self.upstream is not None and not self.session.lingering:
            self.upstream.close()  # (a lingering session closes it once its business there is done)

    def pause_writing(self) -> None:  # the client is slow to read replies
        self.up_paused |= P_CLIENT_FULL
        if self.upstream is not None:
            self.upstream.pause_reading()
        session = self.session
        link = session.pool_link if session is not None else None
        if link is not None and link.shared is not None:
            # a shared connection: its reading pauses for this client for a short while only
            # (proxy.pool.STALL), and this client sends nothing more meanwhile
            link.shared.client_full(link)
            self.pause(P_OUTPUT_FULL)
        elif session is not None and not session.awaiting_upstream:
            # The buffer filled with replies the proxy answers itself (NOAUTH, cap refusals, local
            # PONGs): no upstream to push back on, so stop reading what produces them. (With
            # upstream replies in flight the client is not paused: the server buffers those
            # replies, as for a direct client that pipelines before reading, and local answers
            # queue behind them within the backlog bound.)
            self.pause(P_OUTPUT_FULL)

    def resume_writing(self) -> None:
        self.up_paused &= ~P_CLIENT_FULL
        if not self.up_paused and self.upstream is not None:
            self.upstream.resume_reading()
        session = self.session
        link = session.pool_link if session is not None else None
        if link is not None and link.shared is not None:
            link.shared._client_drained(link)
        self.resume(P_OUTPUT_FULL)

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

    def internal_error(self) -> None:
        """A bug in the proxy while handling this client: logged with its traceback, and this client
        is closed (its commands in flight are lost, as on a dropped connection); the others go on."""
        peer = self.session.peer if self.session is not None else "?"
        log.exception("internal error handling client %s: closing its connection", peer)
        if self.session is not None:
            with contextlib.suppress(Exception):
                self.session.upstream_lost("internal error")
        self._close_client()

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.proxy.stats.upstream_connections += 1  # (respmeter_upstream_connections)

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c.session is not None:
            try:
                c.session.upstream_data(data)
            except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
                c.internal_error()
                return
            if c.paused & P_BACKLOG:
                c._check_backlog()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.client
        c.proxy.stats.upstream_connections -= 1
        session = c.session
        if session is None or session.closed:
            return
        if session.end.relayed_at is not None and exc is None:
            # the server closed after the client's end, passed on to it (proxy.clientend): what
            # it owed is written; a command still blocked there is dropped, as Redis drops it
            session.upstream_lost("the client ended")
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
        elif not session.got_reply and not tls and session.pending:
            # it took a request and closed without a word: what a TLS port does with plain text
            reason = f"{reason} before replying (if it is a TLS port, use rediss://)"
            if session.stats.on_upstream_broken is not None:
                session.stats.on_upstream_broken(reason)
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
        c = self.client
        c.pause(P_UPSTREAM_FULL)
        if c.session is not None and c.session.n_special:
            # what we write may come from what we read from it (proxy.pollhold sends a large item
            # back as it arrives): stop reading until it takes our writes (the server keeps reading)
            c.up_paused |= P_ECHO_FULL
            if c.upstream is not None:
                c.upstream.pause_reading()

    def resume_writing(self) -> None:
        c = self.client
        c.resume(P_UPSTREAM_FULL)
        if c.up_paused & P_ECHO_FULL:
            c.up_paused &= ~P_ECHO_FULL
            if not c.up_paused and c.upstream is not None:
                c.upstream.resume_reading()


def open_upstream(settings: ProxySettings, factory: Callable[[], asyncio.BaseProtocol]) -> Any:
    """Connect ``factory()`` to the upstream (TCP or a unix socket, TLS when configured), within the
    connect timeout: an awaitable of (transport, protocol)."""
    u = settings.upstream
    loop = asyncio.get_running_loop()
    if u.path:
        coro = loop.create_unix_connection(factory, u.path)
    else:
        coro = loop.create_connection(
            factory, u.host, u.port, ssl=settings.ssl_context,
            server_hostname=(settings.server_hostname or u.host) if settings.ssl_context else None,
        )
    return asyncio.wait_for(coro, settings.connect_timeout)


def tune_upstream(transport: Any, settings: ProxySettings) -> None:
    """An upstream socket: no Nagle delay, TCP keepalive (--upstream-keepalive), our write buffer."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings.keepalive:
            set_keepalive(sock, *settings.keepalive)
    transport.set_write_buffer_limits(high=WRITE_HIGH)


def set_keepalive(sock: socket.socket, idle: int, interval: int, count: int) -> None:
    """TCP keepalive: a dead upstream connection is found without sending a (billable) command."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def fd_headroom(max_clients: int, log: logging.Logger) -> None:
    """Each client takes two descriptors (its own and its upstream's): raise the soft limit toward
    the hard one when --max-clients needs it, and say so when it still falls short."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    need = 2 * max_clients + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "file descriptor limit %d is below what --max-clients %d needs (%d): clients past what "
            "fits get '-ERR respmeter: out of file descriptors'; raise ulimit -n / LimitNOFILE",
            soft, max_clients, need,
        )


FD_RESERVE = 16  # descriptors kept free for the admin endpoint, the state file and refusing clients


def fd_budget() -> int:
    """How many clients fit in the file descriptor limit (each takes two: its own and its
    upstream's), keeping a reserve so that one more client can still be told why it is refused."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on POSIX
        return 1 << 30
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 32
    return max(1, (soft - used - FD_RESERVE) // 2)


class Proxy:
    def __init__(self, settings: ProxySettings, listens: list[Listen], stats: Stats, health: Health) -> None:
        self.settings = settings
        self.listens = listens
        self.stats = stats
        self.health = health
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.connect_seconds = 0.0
        self._noted: dict[str, float] = {}  # refusal reason -> when it was last logged
        self.on_stall: Callable[[str], None] | None = None  # told when an upstream stalls
        self._watch: asyncio.Task | None = None
        self.fd_clients = fd_budget()

    def note_refusal(self, reason: str, text: str) -> None:
        """Log a refused client as a warning, at most once a minute per reason."""
        now = time.monotonic()
        if now - self._noted.get(reason, -120.0) >= 60.0:
            self._noted[reason] = now
            log.warning("refusing clients: %s", text)

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
        self._watch = loop.create_task(self._watch_stalls())

    async def _watch_stalls(self) -> None:
        """Once a second: a client whose reply is overdue (see Session.stalled) gets an error and is
        closed, and the upstream is reported degraded."""
        timeout = self.settings.upstream_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            stalled = 0
            for conn in list(self.connections):
                session = conn.session
                if session is not None and not session.closed and session.stalled(session.clock(), timeout):
                    session.upstream_timeout(timeout)
                    stalled += 1
            if self.settings.pool is not None:
                stalled += self.settings.pool.check_stalls(time.monotonic(), timeout)
            if stalled:
                reason = f"upstream timeout: {stalled} request(s) got no reply in {timeout:g}s"
                self.stats.upstream_error("timeout")
                log.warning("%s", reason)
                if self.on_stall is not None:
                    self.on_stall(reason)

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
        """Stop accepting and drain (up to ``timeout``), then close everything.

        Draining: each client is closed once it is quiet, with nothing in flight, for DRAIN_QUIET
        seconds, or as soon as it asks for a blocking command, which is then held, never sent: a pop
        that took an item from a list just before the client is cut off would lose it (a Celery
        worker acks a message with a MULTI right after its BRPOP returns). Commands keep being read
        meanwhile, so such a follow-up still goes through."""
        if self._watch is not None:
            self._watch.cancel()
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.session is not None:
                conn.session.draining = True
        start = time.monotonic()
        deadline = start + timeout
        busy_at: dict[ClientConnection, float] = {}  # when each was last seen with work in flight
        while time.monotonic() < deadline:
            now = time.monotonic()
            for c in list(self.connections):
                s = c.session
                if s is None or s.closed:
                    continue
                if s.pending or (not s.idle and not s.drain_held):
                    busy_at[c] = now
                    continue
                if s.drain_held or s.parked or now - busy_at.get(c, start) >= DRAIN_QUIET:
                    c.close()
            if not any(c.session is not None and not c.session.closed for c in self.connections):
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self.settings.pool is not None:
            self.settings.pool.close()
        for listen in self.listens:
            if listen.path:
                with contextlib.suppress(OSError):
                    os.unlink(listen.path)
        await asyncio.sleep(0)
