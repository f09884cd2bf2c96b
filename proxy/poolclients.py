"""Pooled clients in CLIENT LIST and CLIENT KILL (proxy.pool).

The server knows nothing of the clients on the pool: their commands arrive over the proxy's
shared connections. So a CLIENT LIST from a client with a connection of its own (CLIENT LIST pins)
gets them added, with ids of the proxy's (from 2^40), their address as the proxy sees it and the
proxy's as ``laddr``; and a CLIENT KILL closes the pooled clients its address or filters name, its
reply counting them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .entries import Admission

log = logging.getLogger("respmeter.pool")

OK = b"+OK\r\n"


def _addr(link: Any, which: str) -> bytes:
    """A pooled client's address as the proxy sees it (peername), or the proxy's (sockname)."""
    t = link.conn.transport
    a = t.get_extra_info(which) if t is not None else None
    if isinstance(a, tuple):
        return f"{a[0]}:{a[1]}".encode() if ":" not in a[0] else f"[{a[0]}]:{a[1]}".encode()
    return f"{a or '?'}:0".encode()


def _append_text(reply: bytes, extra: bytes) -> bytes:
    """A bulk (RESP2) or verbatim (RESP3) string reply with ``extra`` appended to its text."""
    kind = reply[:1]
    if kind not in (b"$", b"=") or not reply.endswith(b"\r\n"):
        return reply
    head = reply.index(b"\r\n")
    body = reply[head + 2 : -2]
    fmt = b""
    if kind == b"=":
        fmt, body = body[:4], body[4:]
    text = fmt + body + extra
    return kind + b"%d\r\n" % len(text) + text + b"\r\n"


def introspect(pool: Any, session: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
    """CLIENT LIST and CLIENT KILL from a client with a connection of its own: the server knows
    nothing of the pooled clients, so the proxy adds them to the list (with ids of its own, their
    address as the proxy sees it and the proxy's as laddr) and kills those a filter names. None:
    nothing of the pool's concerns it (forwarded as it is)."""
    if name == "client|list":
        links = _listed(pool, args)
        if not links:
            return None
        extra = b"".join(_line(pool, link) for link in sorted(links, key=lambda x: x.id))
        slot = bytearray()  # (the reply, written when the server's comes: see session._answer)

        def listed(error: bool, data: bytes) -> None:
            slot[:] = data if error else _append_text(data, extra)

        up = session.push_internal(args, listed, client=session.client)
        return Admission.INJECT_REPLY, (up, slot, "ok"), ""
    links = _matching(pool, args)
    if not links:
        return None
    for link in links:
        log.info("CLIENT KILL from %s: closing pooled client %s", session.peer, link.session.peer)
        link.conn.close()
    if len(args) == 3:  # (the old form names one address: the proxy's own client, answered here)
        return Admission.REPLY, OK, "local"
    killed = bytearray()

    def counted(error: bool, data: bytes) -> None:
        try:
            killed[:] = data if error else b":%d\r\n" % (int(data[1:].strip()) + len(links))
        except ValueError:
            killed[:] = data

    up = session.push_internal(args, counted, client=session.client)
    return Admission.INJECT_REPLY, (up, killed, "ok"), ""

def _listed(pool: Any, args: list[bytes]) -> list[Any] | None:
    """The pooled clients CLIENT LIST [TYPE t] [ID id ...] shows (None: not understood here)."""
    links = [link for link in pool.members if not link.closed and not link.session.closed]
    if len(args) == 2:
        return links
    opt = args[2].lower()
    if opt == b"type" and len(args) == 4:
        return links if args[3].lower() == b"normal" else []
    if opt == b"id" and len(args) > 3:
        try:
            ids = {int(a) for a in args[3:]}
        except ValueError:
            return None
        return [link for link in links if link.id in ids]
    return None

def _matching(pool: Any, args: list[bytes]) -> list[Any] | None:
    """The pooled clients a CLIENT KILL names: ``ip:port``, or filters (ID, ADDR, LADDR, USER,
    TYPE, MAXAGE, SKIPME) that must all match. None: not understood here."""
    links = [link for link in pool.members if not link.closed and not link.session.closed]
    if len(args) == 3:
        return [link for link in links if _addr(link, "peername") == args[2]]
    if len(args) < 4 or len(args) % 2:
        return None
    now = time.monotonic()
    for i in range(2, len(args), 2):
        key, value = args[i].lower(), args[i + 1]
        if key == b"id":
            links = [x for x in links if str(x.id).encode() == value]
        elif key == b"addr":
            links = [x for x in links if _addr(x, "peername") == value]
        elif key == b"laddr":
            links = [x for x in links if _addr(x, "sockname") == value]
        elif key == b"user":
            links = [x for x in links if (x.session.user or "default").encode() == value]
        elif key == b"type":
            links = links if value.lower() == b"normal" else []
        elif key == b"maxage":
            try:
                age = int(value)
            except ValueError:
                return None
            links = [x for x in links if now - x.since >= age]
        elif key != b"skipme":  # (the caller has a connection of its own: never one of these)
            return None
    return links

def _line(pool: Any, link: Any) -> bytes:
    s = link.session
    name = (s.name or b"").decode("ascii", "replace")
    return (f"id={link.id} addr={_addr(link, 'peername').decode()} laddr={_addr(link, 'sockname').decode()} "
            f"fd=-1 name={name} age={int(time.monotonic() - link.since)} idle=0 flags=N db={pool.db} sub=0 "
            f"psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 "
            f"omem=0 tot-mem=0 events=r cmd=NULL user={s.user or 'default'} redir=-1 resp={s.protocol}\n"
            ).encode()
