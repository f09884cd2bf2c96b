"""The connection handshake, answered by the proxy itself when nothing may go upstream.

Client libraries open every connection with a few commands: redis-py 8 sends HELLO (RESP3), CLIENT
SETINFO twice, CLIENT MAINT_NOTIFICATIONS, and SELECT or CLIENT SETNAME when configured. At an
exhausted cap each of them would get the cap error, and the client would fail to connect at all
(Celery under ``on_cap = "idle"`` could not even start). The :class:`HandshakeBook` remembers what
the server really answered (the latest HELLO reply per protocol, and the first reply to each exact
CLIENT SETINFO/MAINT_NOTIFICATIONS) and answers the handshake from that, with a connection id of
its own. A plain object: the session records replies into it, the policy asks it for answers.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from .resp import encode_error

# Commands whose real replies are recorded (the session keeps a copy of the reply bytes)
RECORDED = frozenset({"hello", "client|setinfo", "client|maint_notifications"})
MAX_RECORDED = 64  # distinct CLIENT SETINFO/MAINT_NOTIFICATIONS argument lists kept

OK = b"+OK\r\n"

# Never forwarded as sent: CLIENT MAINT_NOTIFICATIONS ON asks the server for maintenance pushes,
# MOVING among them, and a client told that its server moves reconnects to the new address itself,
# past the proxy (its commands then go uncounted and uncapped). It goes as OFF, spelled as the client
# spelled it: a server without the feature refuses it exactly as it would have refused ON (Redis 7:
# "unknown subcommand 'MAINT_NOTIFICATIONS'"), and one with it says OK and sends nothing. Being the
# server's own reply, it is right inside MULTI and under CLIENT REPLY OFF/SKIP, and billed as sent.
REWRITTEN_NAMES = frozenset({"client|maint_notifications"})


def rewrite(args: list[bytes], name: str) -> list[bytes] | None:
    """What goes upstream instead of this command, or None: it goes as sent."""
    if name == "client|maint_notifications" and len(args) >= 3 and args[2].lower() == b"on":
        return [args[0], args[1], b"OFF"]
    return None


_ID = re.compile(rb"(\$2\r\nid\r\n:)(-?[0-9]+)(\r\n)")
# When no HELLO reply has been seen since the proxy started: the fields every server sends
_HELLO_FIELDS = (
    (b"server", b"redis"), (b"version", b"0.0.0"), (b"proto", None), (b"id", None),
    (b"mode", b"standalone"), (b"role", b"master"), (b"modules", []),
)


def _valid_name(name: bytes) -> bool:
    return all(33 <= c <= 126 for c in name)


def _synthetic_hello(proto: int) -> bytes:
    out = [b"%%%d\r\n" % len(_HELLO_FIELDS) if proto == 3 else b"*%d\r\n" % (2 * len(_HELLO_FIELDS))]
    for key, value in _HELLO_FIELDS:
        out.append(b"$%d\r\n%s\r\n" % (len(key), key))
        if key == b"proto":
            out.append(b":%d\r\n" % proto)
        elif key == b"id":
            out.append(b":0\r\n")
        elif isinstance(value, list):
            out.append(b"*0\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(out)


class HandshakeBook:
    def __init__(self, first_id: int = 1 << 32) -> None:
        self.hello: dict[int, bytes] = {}  # protocol -> the server's latest HELLO reply
        self.replies: dict[tuple[bytes, ...], bytes] = {}  # exact arguments -> first reply
        self._ids = itertools.count(first_id)  # ids of connections answered here (not the server's)

    # -- recording (the session) ----------------------------------------------------------------
    def wants(self, name: str, args: list[bytes]) -> bool:
        """Should the session keep a copy of this command's reply?"""
        if name == "hello":
            return True
        return name in RECORDED and self._key(args) not in self.replies

    def record(self, name: str, args: list[bytes], reply: bytes, error: bool, protocol: int) -> None:
        if name == "hello":
            if not error and reply[:1] in (b"%", b"*"):
                self.hello[protocol] = reply
        elif len(self.replies) < MAX_RECORDED:
            self.replies.setdefault(self._key(args), reply)

    def recorded(self, args: list[bytes]) -> bytes | None:
        """The server's first reply to exactly this CLIENT SETINFO/MAINT_NOTIFICATIONS, if seen."""
        return self.replies.get(self._key(args))

    @staticmethod
    def _key(args: list[bytes]) -> tuple[bytes, ...]:
        return tuple(a.lower() for a in args[:2]) + tuple(args[2:])

    # -- answering (the policy) ------------------------------------------------------------------
    def answer(self, session: Any, args: list[bytes], name: str) -> bytes | None:
        """The local answer to a handshake command, with the session's connection state updated as
        the server would have done; None when ``args`` is not a handshake command answered here."""
        if name == "hello":
            return self._hello(session, args)
        if name == "client|setname":
            if len(args) != 3 or not _valid_name(args[2]):
                return None
            session.set_name(args[2])
            return OK
        if name in ("client|setinfo", "client|maint_notifications"):
            return self.replies.get(self._key(args), OK if name == "client|setinfo" else None)
        if name == "select" and len(args) == 2 and args[1] == b"0":
            return OK
        return None

    def _hello(self, session: Any, args: list[bytes]) -> bytes | None:
        proto = session.protocol
        if len(args) >= 2:
            try:
                proto = int(args[1])
            except ValueError:
                return encode_error("ERR Protocol version is not an integer or out of range")
            if proto not in (2, 3):
                return encode_error("NOPROTO unsupported protocol version")
        name = None
        i = 2
        while i < len(args):
            opt = args[i].lower()
            if opt == b"setname" and i + 1 < len(args) and _valid_name(args[i + 1]):
                name = args[i + 1]
                i += 2
            elif opt == b"auth" and i + 2 < len(args):
                i += 3  # the client's credentials, checked by the proxy already (proxy.gate)
            else:
                return None  # (AUTH is the gate's; anything else: not a plain handshake)
        reply = self.hello.get(proto) or _synthetic_hello(proto)
        reply = _ID.sub(lambda m: m.group(1) + b"%d" % next(self._ids) + m.group(3), reply, count=1)
        session.protocol = proto
        if name is not None:
            session.set_name(name)
        return reply
