"""What a session keeps for each command in flight (:class:`Pending`, and the plain tuples of its
fast path: see proxy.session), and what the policy layer decides for one command
(:class:`Admission`). No I/O and no state of their own: the session, the gate, the limits and the
savers share these words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# where an INTERNAL entry's reply goes instead of its callback (Pending.relaying)
RELAY_CLIENT = 1
RELAY_UPSTREAM = 2

# Pending entry kinds
UPSTREAM = 0  # forwarded; its reply goes to the client
LOCAL = 1  # answered by the proxy; ``reply`` holds the bytes
INTERNAL = 2  # sent by the proxy on its own behalf; its reply is consumed here


class Pending:
    """A command whose reply (or local answer) the client has yet to receive."""

    __slots__ = (
        "name",
        "client",
        "kind",
        "t0",
        "timed",
        "deferred",
        "args",
        "reply",
        "expect",
        "sub",
        "on_reply",
        "deadline",
        "capture",
        "relay",
        "relaying",
        "divert",
    )

    def __init__(self, name: str, client: str, kind: int, t0: float, args: list[bytes] | None) -> None:
        self.name = name
        self.client = client
        self.kind = kind
        self.t0 = t0
        self.timed = True
        self.deferred = False  # sent inside MULTI: counted upstream once its fate is known
        self.args = args  # kept only for SPECIAL commands
        self.reply: bytes | None = None
        self.expect: int | None = 1  # reply frames still expected; None: computed at the head
        self.sub = False  # a (P|S)(UN)SUBSCRIBE outside MULTI: confirmations are pushes
        self.on_reply: Callable[[bool, bytes], None] | None = None
        self.deadline: float | None = None  # a blocking command: its own timeout runs out then
        self.capture: list[bytes] | None = None  # its reply is recorded (proxy.handshake): its args
        self.relay: Callable[[], bool] | None = None  # INTERNAL: may its reply go to the client?
        # INTERNAL: should its reply go back upstream, from what has come of it so far? (proxy.pollhold)
        self.divert: Callable[[bytearray], Any] | None = None
        self.relaying = 0  # RELAY_CLIENT / RELAY_UPSTREAM: where its reply goes (its callback gets no bytes)


class Admission:
    """What the policy layer decided for one command (see :meth:`Session.admit`)."""

    FORWARD = 0
    REPLY = 1  # answer locally with ``reply`` (outcome ``outcome``)
    WAIT = 2  # hold this command (and all after it) until ``resume`` is called
    REPLACE = -1  # forward ``payload`` instead of the command's bytes
    PREFIX = -2  # write ``payload`` (the proxy's own commands, see push_internal) before the command
    INJECT_REPLY = -3  # payload = (bytes for upstream instead of the command, local reply, outcome)
    PARK = 3  # the policy took the command and answers it later (Session.late_reply; proxy.pollhold)
    WATCH = 4  # forward it, and call ``payload(error, reply bytes)`` with its reply (proxy.events)
