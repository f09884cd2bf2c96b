"""The ``events`` saver: PUBLISH answered and delivered by the proxy when only its clients listen.

A Celery worker PUBLISHes a ~700-byte heartbeat every 2 seconds (43,200 billed commands a day), and
its only listener is usually the worker's own gossip consumer, which PSUBSCRIBEs
``/0.celeryev/worker.*`` through the proxy. The proxy knows its own clients' subscriptions exactly
(from the server's confirmations, proxy.session). For a watched channel (``channels``, globs) it
forwards a PUBLISH and remembers the server's reply: how many subscriptions received it. While that
number equals the number of matching subscriptions of the proxy's own clients, nobody else listens:
the next PUBLISH is answered locally with that number, and the proxy writes the message to those
clients itself, framed as the server frames it (``message`` / ``pmessage``, RESP2 arrays or RESP3
pushes). Every ``recheck`` seconds the PUBLISH goes upstream again.

Costs, documented in the README: a subscriber connected to the server directly (not through the
proxy) misses messages until the next recheck; a message answered locally reaches subscribers in the
order the proxy sees PUBLISHes, which for one publisher is the order it sent them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from .redisglob import compile_glob
from .entries import Admission

MAX_CHANNELS = 1024  # watched channels whose last real reply is remembered


def message_frame(protocol: int, channel: bytes, data: bytes, pattern: bytes | None = None) -> bytes:
    """A pub/sub message exactly as the server frames it for a client of ``protocol``."""
    head = b">" if protocol == 3 else b"*"
    if pattern is None:
        return b"%s3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            head, len(channel), channel, len(data), data)
    return b"%s4\r\n$8\r\npmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        head, len(pattern), pattern, len(channel), channel, len(data), data)


class EventsSaver:
    def __init__(
        self,
        channels: Iterable[str],
        recheck: float,
        stats: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.globs = [compile_glob(c.encode()) for c in channels]
        self.recheck = recheck
        self.stats = stats
        self.clock = clock
        self.subscribers: dict[Any, None] = {}  # sessions with a subscription (insertion order)
        self.unknown: set[Any] = set()  # sessions subscribed inside MULTI: not tracked exactly
        self.real: dict[bytes, tuple[int, float]] = {}  # channel -> (server's last reply, when)
        self._pattern_cache: dict[bytes, Callable[[bytes], bool]] = {}

    # -- sessions ---------------------------------------------------------------------------------
    def init_session(self, session: Any) -> None:
        session.subs.names = {}
        session.subs.on_change = self._changed
        session.on_close.append(lambda: self._gone(session))

    def _changed(self, session: Any) -> None:
        if session.subs.unknown:
            self.unknown.add(session)
        else:
            self.unknown.discard(session)
        subs = session.subs.names
        if any(subs.values()):
            self.subscribers[session] = None
        else:
            self.subscribers.pop(session, None)

    def _gone(self, session: Any) -> None:
        self.subscribers.pop(session, None)
        self.unknown.discard(session)

    # -- PUBLISH ------------------------------------------------------------------------------------
    def watched(self, channel: bytes) -> bool:
        return any(g(channel) for g in self.globs)

    def _match(self, pattern: bytes, channel: bytes) -> bool:
        m = self._pattern_cache.get(pattern)
        if m is None:
            if len(self._pattern_cache) > 4096:
                self._pattern_cache.clear()
            m = self._pattern_cache[pattern] = compile_glob(pattern)
        return m(channel)

    def local_receivers(self, channel: bytes, data: bytes) -> list[tuple[Any, bytes]]:
        """(session, frame) for every subscription of the proxy's clients this PUBLISH reaches:
        a client's channel subscription first, then its matching patterns, as the server delivers."""
        out = []
        for s in self.subscribers:
            if s.closed or s.lingering:
                continue
            subs = s.subs.names
            proto = 3 if s.protocol == 3 else 2
            if channel in subs.get(b"channel", ()):
                out.append((s, message_frame(proto, channel, data)))
            for pat in subs.get(b"pattern", ()):
                if self._match(pat, channel):
                    out.append((s, message_frame(proto, channel, data, pat)))
        return out

    def admit(self, session: Any, args: list[bytes]) -> tuple[int, Any, str] | None:
        if len(args) != 3:
            return None
        channel = args[1]
        if not self.watched(channel):
            return None
        if self.unknown:
            return None
        receivers = self.local_receivers(channel, args[2])
        n = len(receivers)
        now = self.clock()
        known = self.real.get(channel)
        if (
            known is None
            or known[0] != n
            or now - known[1] >= self.recheck
            or session.awaiting_upstream  # (what it sent before runs first: keep the order)
        ):
            return Admission.WATCH, lambda error, reply: self._learn(channel, error, reply, now), ""
        for s, frame in receivers:
            s.push_local(frame)
        self.stats.count_saved(session.client, "publish", "events")
        return Admission.REPLY, b":%d\r\n" % n, ""

    def _learn(self, channel: bytes, error: bool, reply: bytes, when: float) -> None:
        """The server's reply to a PUBLISH that went upstream: how many subscriptions it reached."""
        if error or reply[:1] != b":":
            self.real.pop(channel, None)
            return
        try:
            n = int(reply[1:].strip())
        except ValueError:
            return
        if channel in self.real or len(self.real) < MAX_CHANNELS:
            self.real[channel] = (n, when)
