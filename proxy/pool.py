"""Upstream pooling (``--upstream-pool N``): clients in their default state share N upstream
connections per protocol; a client whose next command depends on the connection gets one of its own.

How it works
------------
* A session on the pool writes through a :class:`PooledLink` (what it gets as its upstream sink):
  its bytes go into its :class:`SharedUpstream`'s buffer with the number of replies they ask for
  (``Session.up_n``), and the buffer goes out in one write per event-loop turn, whoever wrote it
  (with nothing in flight and one client at a time, a write goes at once: no one to batch with).
* The shared connection's replies are cut at frame boundaries (the C framer) and each session gets
  exactly the bytes of its own replies, in order: ordinary replies through
  ``Session.whole_replies`` (not framed a second time), anything else through
  ``Session.upstream_data``. Counting, caps, key patterns and the report see what they see without
  a pool.
* Pinning: at a command :func:`proxy.pinning.pins` names (blocking, pub/sub, MULTI/WATCH, CLIENT
  TRACKING, SELECT of another db, unknown, ...), or a request too large to hold, the session waits
  until its replies in flight are back, leaves the pool and opens a connection of its own, set up
  with its connection state (the proxy's credentials and db, HELLO 3, CLIENT SETNAME), counted like
  any other command.
* Handshakes are answered here for pooled clients (:meth:`UpstreamPool.answer`): HELLO from the
  server's real HELLO reply (learnt by each shared connection's own HELLO) with a connection id of
  the proxy's, CLIENT SETINFO/SETNAME/GETNAME, SELECT of the upstream's db, QUIT, and PING while
  the pool has a live connection: a connect, GET, disconnect client costs 1 upstream command.
* Faults: a shared connection that breaks gives each client with commands in flight on it an error
  for exactly those commands (nothing is retried: a write may have run); a client whose reply was
  cut in the middle is closed. The others go on over a new connection, opened when next needed.
* A pooled client that does not read its replies pauses the shared connection's reading (others'
  replies wait behind its own, as on one connection); whoever keeps it paused once a stall episode
  is ``STALL`` seconds old is disconnected (an episode: pauses close together, from one client that
  reads too slowly or from several that stall in turn), so a bystander waits about that long at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Any, Callable

from . import commands as cmdtable
from . import poolclients, resp
from .auth import split_hello
from .handshake import rewrite
from .metrics import PROXY_CLIENT
from .quotaerrors import UPSTREAM_REFUSED, credentials_refused, unsupported
from .resp import KIND_ERROR, KIND_PUSH, encode_command, encode_error
from .server import P_UPSTREAM_FULL, classify_connect_error, open_upstream, tune_upstream

log = logging.getLogger("respmeter.pool")

STALL = 2.0  # seconds a pooled client that does not read may keep its shared connection paused
STALL_GAP = 1.0  # pauses of a shared connection less than this apart are one stall episode
STALL_GRACE = 0.2  # seconds a client that fills up late in an episode still has to read
PONG = b"+PONG\r\n"
OK = b"+OK\r\n"
# what a pooled client may send that the pool answers itself (never on the session's fast path)
# what each shared connection asks once, to learn whether the server knows these (harmless either way)
PROBES = {"client|setinfo": (b"CLIENT", b"SETINFO", b"LIB-NAME", b"respmeter"),
          "client|maint_notifications": (b"CLIENT", b"MAINT_NOTIFICATIONS", b"OFF")}
PROBE_NAMES = {v: k for k, v in PROBES.items()}
ANSWERED = frozenset({"hello", "auth", "quit", "ping", "select", "client|setname", "client|setinfo",
                      "client|getname", "client|maint_notifications"})


def slow_names() -> frozenset[str]:
    """Names a pooled session hands to the gate one by one (never on its fast path): those that may
    pin it, and those answered here."""
    from .pinning import PIN_RULES

    return frozenset(PIN_RULES) | ANSWERED | {cmdtable.UNKNOWN}


def admit(pool: "UpstreamPool", session: Any, args: list[bytes], name: str) -> tuple[str, Any] | None:
    """The pool's verdict on a pooled session's command (proxy.gate): ("reply", bytes) answered
    here, ("wait", None) held until it can go (pinned, or moved to the other protocol's
    connections), or None: it goes over the shared connection."""
    from .pinning import pins

    link = session.pool_link
    why = pins(args)
    if why is None:
        verdict = pool.answer(session, args, name) if name in ANSWERED else None
        if verdict is None:
            return None
        kind, value = verdict
        if kind == "reply":
            return verdict
        if kind == "move":
            link.when_drained(session.resume)
            return "wait", None
        why = value
    pool.pin(link, why, args if name == "auth" else None)
    return "wait", None


def _setinfo_ok(args: list[bytes]) -> bool:
    """CLIENT SETINFO LIB-NAME|LIB-VER value that Redis accepts (printable, no spaces)."""
    return (len(args) == 4 and args[2].lower() in (b"lib-name", b"lib-ver")
            and all(33 <= c <= 126 for c in args[3]))


class PooledLink:
    """A session's way to the pool: the upstream sink Session.upstream_connected gets."""

    __slots__ = ("pool", "conn", "session", "shared", "sent", "inflight", "closed", "stall_timer", "on_drained",
                 "proto", "id", "since")

    def __init__(self, pool: "UpstreamPool", conn: Any) -> None:
        self.pool = pool
        self.conn = conn  # proxy.server.ClientConnection
        self.session = conn.session
        self.shared: SharedUpstream | None = None
        self.sent = 0  # session.up_n at the last write
        self.inflight = 0  # replies still to come over the shared connection
        self.closed = False
        self.stall_timer: asyncio.TimerHandle | None = None
        self.on_drained: Callable[[], None] | None = None  # to do once nothing is in flight
        self.proto = 2
        self.id = next(pool._ids)  # its id in CLIENT LIST (the proxy's: it has no connection of its own)
        self.since = time.monotonic()
        pool.members.add(self)
        # (however the session ends: also before its shared connection was ready, or when that failed)
        self.session.on_close.append(lambda: pool.members.discard(self))

    def write(self, data: bytes) -> None:
        """The session's bytes, asking for the replies it counted since its last write: into the
        shared connection's buffer (written at the end of this loop turn), or written at once when
        nothing is in flight there (no batching to wait for)."""
        up_n = self.session.up_n
        n = up_n - self.sent
        self.sent = up_n
        self.inflight += n
        shared = self.shared
        if shared is None or self.closed:  # (cannot happen: the session is not connected then)
            return
        routes = shared.routes
        idle = not routes and not shared.out
        if n:
            if not routes:
                shared.due_since = time.monotonic()
            if routes and routes[-1][0] is self:
                routes[-1][1] += n
            else:
                routes.append([self, n])
        if idle and shared.solo and shared.transport is not None and not shared.dead:
            shared.transport.write(data)
            return
        shared.out.append(data)
        if not shared.scheduled:
            shared.scheduled = True
            self.pool.loop.call_soon(shared.flush)

    def close(self) -> None:
        """The session is done with the pool (closed, or leaving it): replies still in flight for
        it are dropped as they come."""
        if self.closed:
            return
        self.closed = True
        self.pool.detach(self)

    def drained(self) -> bool:
        """No reply of its is due on the shared connection (nor asked for and not written yet)."""
        return (self.inflight == 0 and self.session.up_n == self.sent
                and (self.shared is None or not self.shared.holds(self)))

    def pin(self, reason: str) -> None:
        """Leave the pool for a connection of its own, once nothing is in flight (the session
        holds the command that asked for it)."""
        self.pool.pin(self, reason)

    def when_drained(self, fn: Callable[[], None]) -> None:
        if self.drained():
            self.pool.loop.call_soon(fn)
        else:
            self.on_drained = fn


class SharedUpstream(asyncio.Protocol):
    """One upstream connection that many sessions' commands share."""

    def __init__(self, pool: "UpstreamPool", proto: int) -> None:
        self.pool = pool
        self.proto = proto
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.dead = False
        self.out: list[bytes] = []
        self.scheduled = False
        # whether the last batch carried one write: then, with nothing in flight, a write goes at
        # once (one client at a time: no one to batch with); else it waits for the loop turn's end,
        # to go with the other clients' (fewer, larger writes and reads for both sides)
        self.solo = True
        self.routes: deque[list[Any]] = deque()  # [link or None (its own handshake), replies left]
        self.framer = resp.ReplyFramer()
        self.links: set[PooledLink] = set()
        self.waiters: list[PooledLink] = []
        self.paused_for: set[PooledLink] = set()
        self.episode: float | None = None  # when the current stall episode began (loop time)
        self.resumed_at = 0.0  # when reading last resumed after a pause
        self.last_data = time.monotonic()  # when it last sent anything
        self.due_since = 0.0  # when a reply last became due while none was
        self.hs_buf = bytearray()
        self.in_push = False  # the last read ended inside a push (dropped, to its end)
        self.hs: list[tuple[list[bytes], Callable[[bool, bytes], None] | None]] = []
        self.refusal: bytes | None = None  # the server's error reply refusing this connection
        self.up_full = False

    # -- connecting ----------------------------------------------------------------------------
    async def connect(self) -> None:
        pool = self.pool
        s = pool.settings
        u = s.upstream
        try:
            await open_upstream(s, lambda: self)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a client-visible error
            kind, reason = classify_connect_error(exc, s.connect_timeout)
            pool.stats.upstream_error(kind)
            pool.health.failed(reason)
            log.warning("upstream pool: %s unavailable: %s", u.address(), reason)
            self._fail(reason)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pool = self.pool
        self.transport = transport  # type: ignore[assignment]
        pool.stats.upstream_connections += 1
        tune_upstream(transport, pool.settings)
        # its own handshake: the proxy's credentials and db, and HELLO (its protocol, and the reply
        # pooled clients' HELLO is answered from)
        cmds = list(pool.upstream_auth.commands()) if pool.upstream_auth is not None else []
        cmds.append([b"HELLO", b"%d" % self.proto])
        # (does the server know CLIENT SETINFO and MAINT_NOTIFICATIONS? Pooled clients' are answered
        # as it would: OK, or its own error)
        cmds += [list(PROBES["client|setinfo"]), list(PROBES["client|maint_notifications"])]
        if pool.limits is not None and not pool.limits.take(PROXY_CLIENT, len(cmds)):
            # a cap is reached: this connection's own handshake would pass it. It closes having
            # sent nothing, and the clients waiting for it go on as without a pool (a connection
            # of their own, the handshake answered by the proxy, every command refused at the cap)
            self.dead = True
            pool.lost(self)
            transport.close()
            waiters, self.waiters = self.waiters, []
            for link in waiters:
                pool.unpool(link, "cap")
            return
        for args in cmds:
            name = cmdtable.command_name(args)
            pool.stats.count_upstream(PROXY_CLIENT, name)
            self.routes.append([None, 1])
            self.hs.append((args, None))
        transport.write(b"".join(encode_command(a) for a in cmds))  # type: ignore[attr-defined]

    def _handshake_reply(self, reply: bytes, error: bool) -> None:
        args, _ = self.hs.pop(0)
        probe = PROBE_NAMES.get(tuple(args))
        if probe is not None:
            self.pool.known[probe] = None if not error else reply
        elif error and not (args[0] == b"HELLO" and unsupported(reply)):
            # its credentials, or the connection itself (a connection limit), refused: told as
            # without a pool (the gate's hooks), and the clients waiting for it get the same error
            text = reply[1:].strip().decode("utf-8", "replace")
            pool = self.pool
            if pool.upstream_auth is None and reply[:7].upper() == b"-NOAUTH":
                # the server wants a password and the proxy has none: its clients send their own
                # AUTH, so no connection can be shared; each gets one of its own (see _fail)
                pool.unshareable(text)
                self.dead = True
                if self.transport is not None:
                    self.transport.abort()
                return
            if credentials_refused(reply):
                self.refusal = UPSTREAM_REFUSED
                if pool.on_auth_error is not None:
                    pool.on_auth_error(text or "the upstream refused HELLO AUTH")
            else:
                self.refusal = reply
                if pool.on_rejected is not None:
                    pool.on_rejected(text)
            self.dead = True  # (the replies after it in this read are not looked at: it is over)
            if self.transport is not None:
                self.transport.abort()
            return
        elif args[0] == b"HELLO":
            if not error:
                self.pool.book.record("hello", args, reply, False, self.proto)
            elif self.proto == 3:
                self._broken(f"upstream refused HELLO 3: {reply[:200]!r}")
                return
        if not self.hs:
            self.ready = True
            self.pool.health.ok()
            self.pool.health.replied()
            if self.pool.on_auth_ok is not None:
                self.pool.on_auth_ok()
            waiters, self.waiters = self.waiters, []
            for link in waiters:
                self.pool._attached(link, self)

    def _fail(self, reason: str) -> None:
        """It could not be opened: the sessions waiting for it get the error (as without a pool:
        the server's own when it refused the connection with one)."""
        self.dead = True
        self.pool.lost(self)
        waiters, self.waiters = self.waiters, []
        for link in waiters:
            s = link.session
            if self.pool.no_share is not None and not s.closed:
                self.pool.unpool(link, "auth")
                continue
            link.closed = True
            if s.closed:
                continue
            if self.refusal is not None:
                s.refuse(self.refusal)
            else:
                s.upstream_failed(reason)

    # -- writing ----------------------------------------------------------------------------------
    def flush(self) -> None:
        self.scheduled = False
        out, self.out = self.out, []
        self.solo = len(out) <= 1
        if out and self.transport is not None and not self.dead:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def holds(self, link: PooledLink) -> bool:
        return any(r[0] is link for r in self.routes)

    # -- reading ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        routes = self.routes
        framer = self.framer
        mid = framer.in_frame  # (this read begins inside a reply: its first byte starts nothing)
        frames = framer.feed(data)
        start = i = 0
        if framer.plain:
            # Ordinary replies only (the usual case): each client's run of them goes to it in one
            # piece, paired with its commands without being framed a second time.
            nf = len(frames)
            while i < nf and routes:
                head = routes[0]
                link = head[0]
                if link is None:
                    break  # (this connection's own handshake: below)
                k = head[1]
                take = k if k <= nf - i else nf - i
                i += take
                end = frames[i - 1][0]
                link.inflight -= take
                if take == k:
                    routes.popleft()
                else:
                    head[1] = k - take
                if not link.closed:
                    session = link.session
                    try:
                        session.whole_replies(data if start == 0 and end == len(data) else data[start:end], take)
                    except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
                        link.conn.internal_error()
                    else:
                        if link.conn.paused:
                            link.conn._check_backlog()
                start = end
                if link.on_drained is not None and link.drained():
                    fn, link.on_drained = link.on_drained, None
                    fn()
            if i == nf and start == len(data):
                return
            if i:
                frames = frames[i:]
        head = routes[0] if routes else None
        prev = start
        for fr in frames:
            end = fr[0]
            if fr[1] == KIND_PUSH:  # (a server notice to the connection: belongs to no client)
                if head is not None and head[0] is not None and prev > start:
                    self._deliver(head[0], data[start:prev])
                start = prev = end
                self.in_push = False
                continue
            prev = end
            if head is None:
                self._broken("upstream sent a reply nobody asked for")
                return
            link = head[0]
            head[1] -= 1
            if link is None:
                if head[1] == 0:
                    routes.popleft()
                    self.hs_buf += data[start:end]
                    reply, self.hs_buf = bytes(self.hs_buf), bytearray()
                    start = end
                    self._handshake_reply(reply, fr[1] == KIND_ERROR)
                    if self.dead:
                        return
                    head = routes[0] if routes else None
                continue
            link.inflight -= 1
            if head[1] == 0:
                routes.popleft()
                self._deliver(link, data[start:end])
                start = end
                if link.on_drained is not None and link.drained():
                    fn, link.on_drained = link.on_drained, None
                    fn()
                head = routes[0] if routes else None
        if start < len(data):  # the start of a reply: its session's own framer carries on with it
            if self.in_push or ((prev or not mid) and prev < len(data) and data[prev] == 0x3E):
                # ('>': a push cut across reads, from prev on: it is dropped whole, to its end)
                if head is not None and head[0] is not None and prev > start:
                    self._deliver(head[0], data[start:prev])  # (replies before it)
                self.in_push = True
            elif head is None:
                self._broken("upstream sent a reply nobody asked for")
            elif head[0] is None:
                self.hs_buf += data[start:]
            else:
                self._deliver(head[0], data[start:])

    def _deliver(self, link: PooledLink, chunk: bytes) -> None:
        if link.closed:
            return
        session = link.session
        if session.closed:
            return
        conn = link.conn
        try:
            session.upstream_data(chunk)
        except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
            conn.internal_error()
            return
        if conn.paused:
            conn._check_backlog()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pool = self.pool
        if self.transport is not None:
            pool.stats.upstream_connections -= 1
        was_ready = self.ready
        self.dead = True
        self.ready = False
        pool.lost(self)
        if pool.closing:
            return
        if exc is None:
            reason, kind = "upstream closed the connection", "eof"
        else:
            reason, kind = f"upstream connection lost: {exc}", "reset"
        if not was_ready:
            self._fail(reason)
            if self.links:
                self._drop_links(reason)
            return
        pool.stats.upstream_error(kind)
        if exc is not None:
            pool.health.failed(reason)
        log.info("upstream pool: a shared connection ended (%s): %d client(s) had commands in flight on it",
                 reason, len({r[0] for r in self.routes if r[0] is not None}))
        self._drop_links(reason)

    def _drop_links(self, reason: str) -> None:
        """Each client with commands in flight gets an error for exactly those (the one whose reply
        was cut in the middle is closed); every client leaves this connection and takes a new one
        when it next needs one."""
        msg = encode_error("ERR " + reason)
        cut = self.routes[0][0] if self.routes and self.framer.in_frame else None
        for link, n in self.routes:
            if link is None or link.closed or link.session.closed:
                continue
            link.inflight -= n
            if link is cut:
                link.session.upstream_lost(reason)
                continue
            self._deliver(link, msg * n)
        self.routes.clear()
        for link in list(self.links):
            self.pool.unplug(link)
            if link.on_drained is not None:  # (a pin or a move waited for these replies: they are over)
                fn, link.on_drained = link.on_drained, None
                self.pool.loop.call_soon(fn)
        for link in list(self.paused_for):
            self._client_drained(link)

    def _broken(self, reason: str) -> None:
        log.warning("upstream pool: %s: closing that shared connection", reason)
        self.pool.stats.upstream_error("protocol")
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:  # the upstream is slow to take our writes
        self.up_full = True
        for link in self.links:
            link.conn.pause(P_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.up_full = False
        for link in list(self.links):
            link.conn.resume(P_UPSTREAM_FULL)

    # -- a pooled client slow to read ------------------------------------------------------------
    def client_full(self, link: PooledLink) -> None:
        """A client's replies wait for it to read: the shared connection stops being read. The
        others' wait is bounded per stall *episode*, not per client: pauses less than
        STALL_GAP apart are one episode (a slow but steady reader that refills at once, clients that
        stall one after another), and whoever keeps the connection paused once the episode is
        STALL old goes (after STALL_GRACE, for one that only just filled up)."""
        if link in self.paused_for or self.transport is None:
            return
        now = self.pool.loop.time()
        if not self.paused_for:
            self.transport.pause_reading()
            if self.episode is None or now - self.resumed_at > STALL_GAP:
                self.episode = now
        self.paused_for.add(link)
        assert self.episode is not None
        due = max(self.episode + STALL, now + STALL_GRACE)
        link.stall_timer = self.pool.loop.call_later(due - now, self._stalled, link)

    def _client_drained(self, link: PooledLink) -> None:
        if link not in self.paused_for:
            return
        self.paused_for.discard(link)
        if link.stall_timer is not None:
            link.stall_timer.cancel()
            link.stall_timer = None
        if not self.paused_for and self.transport is not None and not self.dead:
            self.transport.resume_reading()
            self.resumed_at = self.pool.loop.time()

    def _stalled(self, link: PooledLink) -> None:
        """It kept the shared connection from being read for STALL seconds: it goes, and the
        others' replies flow again (its own are dropped as they come)."""
        link.stall_timer = None
        if link not in self.paused_for:
            return
        log.info("upstream pool: client %s kept a shared connection from being read for %gs (not reading its "
                 "replies fast enough): closing it", link.session.peer, STALL)
        self.pool.stats.refused_connections["slow_reader"] += 1
        session = link.session
        session.lingering = True  # (nothing more is written to it)
        link.close()
        session.upstream_lost("did not read its replies")
        self._client_drained(link)


class UpstreamPool:
    """``size`` shared upstream connections per protocol, opened when first needed."""

    def __init__(self, size: int, settings: Any, stats: Any, health: Any, book: Any, upstream_auth: Any,
                 limits: Any = None, loop: asyncio.AbstractEventLoop | None = None,
                 on_auth_error: Callable[[str], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None,
                 on_auth_ok: Callable[[], None] | None = None) -> None:
        self.size = size
        # what a shared connection's handshake tells, refused or accepted (proxy.gate's hooks)
        self.on_auth_error = on_auth_error
        self.on_rejected = on_rejected
        self.on_auth_ok = on_auth_ok
        self.settings = settings
        self.stats = stats
        self.health = health
        self.book = book  # proxy.handshake.HandshakeBook
        self.upstream_auth = upstream_auth if upstream_auth is not None and upstream_auth.active else None
        self.db = upstream_auth.db if upstream_auth is not None else 0
        self.limits = limits
        self.loop = loop or asyncio.get_event_loop()
        self.shared: dict[int, list[SharedUpstream]] = {2: [], 3: []}
        self._next = itertools.count()
        self._ids = itertools.count(1 << 40)
        self.members: set[PooledLink] = set()  # the clients on the pool (CLIENT LIST shows them)
        self.known: dict[str, bytes | None] = {}  # PROBES name -> None (known) or the server's error
        self.closing = False
        self.no_share: str | None = None  # why no connection can be shared (see unshareable)

    def unshareable(self, text: str) -> None:
        """The server refused a shared connection's HELLO for want of a password, and the proxy has
        none: its clients authenticate themselves, so each gets a connection of its own, as without
        a pool (not a credentials error: the proxy's are not wrong, it has none)."""
        if self.no_share is None:
            log.warning("upstream pool: the server requires a password and the proxy has none (--upstream URL, "
                        "--upstream-password-file): no connection can be shared, each client gets its own and "
                        "authenticates itself (%s)", text[:120])
        self.no_share = text

    # -- attaching ----------------------------------------------------------------------------------
    def request(self, conn: Any) -> Callable[[], None]:
        """The session's request_upstream hook: attach it to the pool when it first needs it."""
        return lambda: self.attach(PooledLink(self, conn))

    def attach(self, link: PooledLink) -> None:
        session = link.session
        if session.closed:
            return
        if self.no_share is not None:
            self.unpool(link, "auth")  # (no connection can be shared: see unshareable)
            return
        link.proto = session.protocol
        if session.waiting:  # (a client that opens with HELLO 3 goes to a RESP3 connection at once)
            first = session.waiting[0][0]
            if len(first) >= 2 and first[0].lower() == b"hello" and first[1] in (b"2", b"3"):
                link.proto = int(first[1])
        link.closed = False
        session.pool_link = link
        conns = self.shared[link.proto]
        live = [c for c in conns if not c.dead]
        if len(live) < self.size:
            shared = SharedUpstream(self, link.proto)
            conns.append(shared)
            self.loop.create_task(shared.connect())
        else:
            shared = live[next(self._next) % len(live)]
        if shared.ready:
            self._attached(link, shared)
        else:
            shared.waiters.append(link)

    def _attached(self, link: PooledLink, shared: SharedUpstream) -> None:
        session = link.session
        if link.closed or session.closed:
            return
        link.shared = shared
        link.sent = session.up_n
        shared.links.add(link)
        session.up_ready = True  # (the shared connection authenticated itself)
        conn = link.conn
        if shared.up_full:
            conn.pause(P_UPSTREAM_FULL)
        try:
            session.upstream_connected(link.write, link.close, ())
        except Exception:  # noqa: BLE001 - a bug must not leave the client hanging
            conn.internal_error()
            return
        conn._check_backlog()

    def detach(self, link: PooledLink) -> None:
        if link.closed:
            self.members.discard(link)
        shared = link.shared
        if shared is not None:
            shared.links.discard(link)
            shared._client_drained(link)
            with contextlib.suppress(ValueError):
                shared.waiters.remove(link)
        if link.session.pool_link is link:
            link.session.pool_link = None

    def unplug(self, link: PooledLink) -> None:
        """Its shared connection is gone: the session takes a new one when it next needs one."""
        self.detach(link)
        link.shared = None
        session = link.session
        if session.closed:
            return
        session.connected = False
        session._send_upstream = None
        session._close_upstream = None
        session.pool_link = link  # (still on the pool: PING and the handshake are answered here)
        session.request_upstream = lambda: self.attach(link) if not link.session.closed else None

    def lost(self, shared: SharedUpstream) -> None:
        conns = self.shared[shared.proto]
        if shared in conns:
            conns.remove(shared)

    # -- pinning ------------------------------------------------------------------------------------
    def pin(self, link: PooledLink, reason: str, auth: list[bytes] | None = None) -> None:
        if link.on_drained is not None:
            return  # (already on its way out)
        link.when_drained(lambda: self._pin_now(link, reason, auth))

    def _pin_now(self, link: PooledLink, reason: str, auth: list[bytes] | None = None) -> None:
        session = link.session
        link.on_drained = None
        if session.closed or session.pool_link is not link:
            return
        if not link.drained():  # (what was asked with it went out after all: its replies first)
            link.on_drained = lambda: self._pin_now(link, reason, auth)
            return
        link.close()
        session.pool_link = None
        session.pinned = reason
        session.connected = False
        session._send_upstream = None
        session._close_upstream = None
        hs = self.setup(session, auth)
        if hs and self.limits is not None and not self.limits.take(PROXY_CLIENT, len(hs)):
            session.refuse(encode_error("ERR respmeter: a cap is reached: no upstream connection can be set up "
                                        "for this client"))
            return
        stats = self.stats
        stats.pinned_clients += 1
        stats.pinned_total[reason] = stats.pinned_total.get(reason, 0) + 1
        session.on_close.append(self._unpinned)
        link.conn.pinned_handshake = hs
        link.conn._start_connect()

    def unpool(self, link: PooledLink, reason: str) -> None:
        """The session goes on as without a pool, on a connection of its own, from its current
        state (nothing was sent for it yet): the gate sends the proxy's credentials as usual."""
        session = link.session
        link.close()
        session.pool_link = None
        if session.closed:
            return
        session.pinned = reason
        self.stats.pinned_clients += 1
        self.stats.pinned_total[reason] = self.stats.pinned_total.get(reason, 0) + 1
        session.on_close.append(self._unpinned)
        session.up_ready = self.upstream_auth is None
        link.conn._start_connect()

    def _unpinned(self) -> None:
        self.stats.pinned_clients -= 1

    def setup(self, session: Any, client_auth: list[bytes] | None = None) -> list[tuple[Any, ...]]:
        """What a client leaving the pool sends first on its own connection, counted like any
        command: the proxy's credentials and db; the client's AUTH when that is what pinned it
        (before anything that needs it; the held AUTH is answered with its reply); then its
        connection state (HELLO 3 for a RESP3 client, with its name; else CLIENT SETNAME). Its
        commands wait for the replies; an error but the AUTH's refuses it (fail closed)."""
        gate = self.settings.policy
        auth = list(self.upstream_auth.commands()) if self.upstream_auth is not None else []
        state: list[list[bytes]] = []
        if session.protocol == 3:
            state.append([b"HELLO", b"3", *((b"SETNAME", session.name) if session.name else ())])
        elif session.name:
            state.append([b"CLIENT", b"SETNAME", session.name])
        session.up_pending = len(auth) + len(state) + (1 if client_auth else 0)
        session.up_refused = False
        session.up_ready = not session.up_pending

        def state_reply(error: bool, data: bytes) -> None:
            session.up_pending -= 1
            if error:
                session.up_refused = True
                log.warning("client %s: its connection state could not be set up on its own connection: %s",
                            session.peer, data[:200].decode("utf-8", "replace").strip())
            if session.up_pending > 0:
                return
            if session.up_refused:
                session.refuse(encode_error("ERR respmeter: this client's connection could not be set up upstream"))
                return
            session.up_ready = True
            session.resume()

        def auth_reply(error: bool, data: bytes) -> None:
            session.pin_answer = data
            state_reply(False, data)

        mine = [(client_auth, auth_reply, session.client)] if client_auth else []
        return ([(c, lambda e, d: gate._handshake_reply(session, e, d)) for c in auth]
                + mine + [(c, state_reply) for c in state])

    # -- answered here ------------------------------------------------------------------------------
    def answer(self, session: Any, args: list[bytes], name: str) -> tuple[str, Any] | None:
        """A pooled session's handshake command: ("reply", bytes) answered here; ("move", proto)
        HELLO to the other protocol, once its replies in flight are back; ("pin", reason); None:
        goes over the shared connection."""
        link = session.pool_link
        if name == "ping":
            if len(args) > 2 or not self.alive(session.protocol):
                return None
            if len(args) == 2:
                return "reply", b"$%d\r\n%s\r\n" % (len(args[1]), args[1])
            return "reply", PONG
        if name == "quit":
            session.close_after_reply = True
            return "reply", OK
        if name == "auth":
            return "pin", "auth"  # (not the proxy's: the gate answers that one before)
        if name == "select":
            # (Redis reads the index strictly: "00" or "+0" is not an integer to it, and is answered
            # by the server on a connection of the client's own)
            if len(args) == 2 and args[1] == b"%d" % self.db:
                return "reply", OK
            return "pin", "select db"
        if name == "client|getname":
            if len(args) != 2:
                return None
            if session.name:
                return "reply", b"$%d\r\n%s\r\n" % (len(session.name), session.name)
            return "reply", b"_\r\n" if session.protocol == 3 else b"$-1\r\n"
        if name == "hello":
            if split_hello(args)[1] is not None and not getattr(self.settings.policy, "intercept_auth", False):
                return "pin", "auth"  # (credentials for the server, not the proxy's: the server checks them)
            proto = session.protocol
            if len(args) >= 2:
                try:
                    proto = int(args[1])
                except ValueError:
                    proto = 0
            if proto in (2, 3) and proto not in self.book.hello:
                return "pin", "hello"  # (the server's HELLO reply is not known yet: it answers)
            if proto in (2, 3) and proto != link.proto:
                if not link.drained():
                    return "move", proto
            reply = self.book.answer(session, args, name)
            if reply is None:
                return "pin", "hello"
            if session.protocol != link.proto:
                self._move(link)
            return "reply", reply
        if name in ("client|setinfo", "client|maint_notifications"):
            recorded = self.book.recorded(args)
            if recorded is not None:
                return "reply", recorded
            if name not in self.known:
                return None  # (not learnt yet: the server answers, and the reply is recorded)
            err = self.known[name]
            if err is not None:  # the server does not know it: its own error, with the client's spelling
                probe = PROBES[name][1]
                return "reply", err.replace(b"'" + probe + b"'", b"'" + args[1][:128] + b"'")
            if name == "client|setinfo" and _setinfo_ok(args):
                return "reply", OK
            if rewrite(args, name) is not None:
                return "reply", OK  # (ON goes as OFF, proxy.handshake.rewrite: what OFF got)
            return None  # (a value it may refuse, or a mode it may take: the server answers)
        if name == "client|setname":
            reply = self.book.answer(session, args, name)
            return None if reply is None else ("reply", reply)
        return None

    def _move(self, link: PooledLink) -> None:
        """HELLO changed the session's protocol (nothing in flight): it takes a connection of that
        protocol when it next sends something."""
        self.unplug(link)

    # -- pooled clients in CLIENT LIST and CLIENT KILL ---------------------------------------------------
    def introspect(self, session: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        """CLIENT LIST and CLIENT KILL from a client with a connection of its own (see
        :mod:`proxy.poolclients`)."""
        return poolclients.introspect(self, session, args, name)

    def alive(self, proto: int) -> bool:
        return any(c.ready for c in self.shared[proto])

    # -- health ---------------------------------------------------------------------------------------
    def check_stalls(self, now: float, timeout: float) -> int:
        """Shared connections with replies due that said nothing for ``timeout`` seconds are closed
        (their clients get errors for what was in flight). Returns how many."""
        n = 0
        mono = time.monotonic()
        for conns in self.shared.values():
            for c in list(conns):
                # (nothing that blocks is on the pool: every reply due is due now)
                if (c.routes and not c.paused_for and mono - max(c.last_data, c.due_since) > timeout
                        and c.transport is not None):
                    n += 1
                    c.transport.abort()
        return n

    def connections(self) -> int:
        return sum(1 for conns in self.shared.values() for c in conns if c.transport is not None and not c.dead)

    def close(self) -> None:
        self.closing = True
        for conns in self.shared.values():
            for c in list(conns):
                if c.transport is not None:
                    c.transport.close()
