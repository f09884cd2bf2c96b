"""The client's end of a connection (it half-closed it: ``shutdown(SHUT_WR)`` after a pipeline).

Redis runs what it has read and writes the replies before it sees the end, then closes: the proxy
answers what was sent, then closes. A blocking command or a subscription in flight is where closing
at once would differ from Redis: a BLPOP that did not block (its list had an item) has taken the
item, and Redis writes it, and what the commands after it get, before it sees the end; one that
blocked is dropped then, taking nothing. So the end is passed on: the upstream connection is
half-closed once everything the client sent is written, Redis answers what it owes and closes, and
so does the proxy. Without a way to half-close it (TLS, a shared connection) they are abandoned at
once, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import commands as cmdtable
from .entries import INTERNAL, UPSTREAM
from .paths import BLOCKING_NAMES, SUBSCRIBE_CMDS


def _open_ended(name: str) -> bool:
    """A command whose reply may never come on its own (it blocks, or it subscribes)."""
    return name in BLOCKING_NAMES or name in SUBSCRIBE_CMDS


class ClientEnd:
    """One session's client end."""

    __slots__ = ("session", "relay", "due", "relayed_at")

    def __init__(self, session: Any) -> None:  # a proxy.session.Session (which imports this module)
        self.session = session
        # how to half-close its own upstream connection, when that can be done (set by the I/O layer)
        self.relay: Callable[[], None] | None = None
        self.due = False  # the end is to be passed on, once what waits is written
        self.relayed_at: float | None = None  # when it was

    def eof(self) -> bool:
        """The client will send nothing more: True keeps the connection until what is owed to it is
        written; False closes it now."""
        s = self.session
        if s.parked:
            return False
        if not s.waiting and all(type(e) is not tuple and e.kind == INTERNAL for e in s.pending):
            return False  # nothing is owed to the client (only the proxy's own commands are in flight)
        open_ended = False
        for e in s.pending:
            if not (e[3] if type(e) is tuple else (e.timed or e.kind != UPSTREAM)):
                if type(e) is tuple or self.relay is None:
                    return False
                open_ended = True
        s.closing = True
        if open_ended or any(w[0] and _open_ended(cmdtable.command_name(w[0])) for w in s.waiting):
            self.due = True
            self.pass_on()
        s._maybe_close()
        return not s.closed

    def pass_on(self) -> None:
        """Half-close the upstream connection, once nothing of the client's waits and a command that
        may wait for ever is in flight there."""
        s = self.session
        if (
            not self.due or s.waiting or not s.connected or self.relay is None
            or not any(type(e) is not tuple and e.kind == UPSTREAM and not e.timed for e in s.pending)
        ):
            return
        relay, self.relay = self.relay, None
        self.due = False
        self.relayed_at = s.clock()
        s._send_upstream = None  # (nothing may be written after the end)
        relay()
