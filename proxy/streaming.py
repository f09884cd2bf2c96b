"""A large request streamed upstream as it arrives, instead of held whole (issue: one client's 500 MB
value must not cost the proxy 500 MB, nor stall everybody while it is framed).

The framing is proxy.resp.RequestParser's (``head``, ``pre``, ``streaming``); this is what the
session does with it: the request is decided on its head (its name and first arguments) through the
session's usual route (policy, caps, counting), and its remaining bytes then follow it upstream, or
are dropped when the proxy answered it itself. While a rate limit holds it, the session's backlog
says "full", so the I/O layer stops reading from the client until it goes.
"""

from __future__ import annotations

from typing import Any

IDLE = 0
FORWARD = 1  # its bytes go upstream as they arrive
DROP = 2  # answered by the proxy: the rest of its bytes are read and dropped
HELD = 3  # waiting for the policy (a rate limit): reading from the client pauses
HELD_BACKLOG = 1 << 30  # what a held stream adds to Session.backlog


class StreamedRequest:
    """The streamed request of one session (at most one at a time)."""

    __slots__ = ("session", "state", "early")

    def __init__(self, session: Any) -> None:  # a proxy.session.Session (which imports this module)
        self.session = session
        self.state = IDLE
        self.early: list[bytes] = []  # its bytes that came while it was held

    def allowed(self) -> bool:
        """A large request may be streamed when it can go (or be answered) at once."""
        s = self.session
        return s.connected and not s.held and not s.waiting and not s.monitor

    def begin(self) -> None:
        """A large request began (the last thing of this read): decide it now, on what is known of
        it, and forward its bytes as they come."""
        s = self.session
        args, head = s.parser.head  # type: ignore[misc]
        s.parser.head = None
        queued = bool(s.waiting or s.held)
        if s.pool_link is not None:
            # its bytes cannot go over a connection other clients share (proxy.pool): it waits
            # for a connection of its own (behind what is queued, if anything: see Session._dispatch)
            s.pool_link.pin("large request")
            queued = True
        verdict = None if queued else s._route(args, s.clock())
        if queued or (verdict is not None and verdict[0] == s.WAIT):
            # behind other commands, or held by a rate limit: keep only its head; the session's
            # backlog pauses reading until it goes (Session._dispatch calls go())
            s.waiting.append((args, head, None, None))
            s.held = True
            self.state = HELD
            return
        self.go(verdict, head)

    def go(self, verdict: tuple[int, Any] | None, head: bytes) -> None:
        """Its verdict is known (None: forward it as it is)."""
        s = self.session
        if verdict is None or verdict[0] == s.PREFIX:
            s._write_upstream(head if verdict is None else verdict[1] + head)
            self.state = FORWARD
            if self.early:
                s._write_upstream(b"".join(self.early))
        else:  # answered by the proxy (or replaced): the rest is read and dropped
            if verdict[0] == s.REPLACE:
                s._write_upstream(verdict[1])
            self.state = DROP
        self.early.clear()
        if not s.parser.streaming:
            self.state = IDLE

    def more(self) -> None:
        """More of it came (``parser.pre``), before the commands of this read."""
        parser = self.session.parser
        pre, parser.pre = parser.pre, None
        if self.state == FORWARD:
            self.session._write_upstream(pre)  # type: ignore[arg-type]
        elif self.state == HELD:
            self.early.append(pre)  # type: ignore[arg-type]  (the I/O layer pauses first)
            return
        if (not parser.streaming and parser.error is None) or parser.head is not None:
            self.state = IDLE  # it ended (and perhaps a new one began after it)
