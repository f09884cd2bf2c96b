"""The proxy's own upstream connection, for commands that cannot go on a client's connection.

A client's connection that is blocked in a held pop (proxy.pollhold) cannot carry the CLIENT
UNBLOCK that lets it go; that goes here. The connection is opened on first use, authenticated with
the proxy's upstream credentials, kept alive by TCP keepalive, and opened again after it breaks.
Every command it sends is counted under client ``respmeter`` and charged to the global caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis

from . import commands as cmdtable
from .metrics import PROXY_CLIENT
from .resp import encode_command

log = logging.getLogger("respmeter.control")

Callback = Callable[[bool, bytes], None]


def _reply_bytes(value: Any) -> tuple[bool, bytes]:
    """(error, a RESP2 rendering of a parsed reply) for the few replies callbacks look at."""
    if isinstance(value, hiredis.ReplyError):
        return True, b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, int):
        return False, b":%d\r\n" % value
    if value is None:
        return False, b"*-1\r\n"
    if isinstance(value, bytes):
        return False, b"$%d\r\n%s\r\n" % (len(value), value)
    return False, b"+OK\r\n"


class ControlLink(asyncio.Protocol):
    def __init__(
        self, settings: Any, stats: Any, handshake: list[list[bytes]], budget: Any = None, db: int = 0
    ) -> None:
        self.settings = settings
        self.db = db  # the database the handshake selects
        self.stats = stats
        self.handshake = handshake  # the proxy's AUTH (and SELECT), sent first on every connection
        self.budget = budget
        self.transport: asyncio.Transport | None = None
        self.connecting = False
        self.queue: list[tuple[list[bytes], Callback | None]] = []  # waiting for a connection
        self.waiting: deque[Callback | None] = deque()  # sent, reply due (in order)
        self.reader = hiredis.Reader()
        self.refused: bytes | None = None  # the upstream's answer to the handshake, if it refused it

    def send(self, args: list[bytes], callback: Callback | None) -> None:
        """Send ``args``; ``callback(error, reply)`` gets its reply (or an error if it cannot go)."""
        if self.budget is not None and not self.budget.take(PROXY_CLIENT, 1):
            if callback is not None:
                callback(True, b"-ERR respmeter: cap reached\r\n")
            return
        if self.transport is not None and not self.transport.is_closing():
            self._write(args, callback)
            return
        self.queue.append((args, callback))
        if not self.connecting:
            self.connecting = True
            asyncio.get_running_loop().create_task(self._connect())

    def _write(self, args: list[bytes], callback: Callback | None) -> None:
        info = cmdtable.lookup(args)
        self.stats.count_upstream(PROXY_CLIENT, info.name if info is not None else cmdtable.UNKNOWN)
        self.waiting.append(callback)
        assert self.transport is not None
        self.transport.write(encode_command(args))

    async def _connect(self) -> None:
        s = self.settings
        u = s.upstream
        loop = asyncio.get_running_loop()
        try:
            if u.path:
                coro = loop.create_unix_connection(lambda: self, u.path)
            else:
                coro = loop.create_connection(
                    lambda: self, u.host, u.port, ssl=s.ssl_context,
                    server_hostname=(s.server_hostname or u.host) if s.ssl_context else None,
                )
            await asyncio.wait_for(coro, s.connect_timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is told to the callers
            self.connecting = False
            log.warning("control connection to the upstream failed: %s", exc)
            queue, self.queue = self.queue, []
            for _args, cb in queue:
                if cb is not None:
                    cb(True, b"-ERR respmeter: control connection failed\r\n")
            return

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connecting = False
        self.reader = hiredis.Reader()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.keepalive:
                from .server import set_keepalive

                set_keepalive(sock, *self.settings.keepalive)
        for args in self.handshake:
            self._write(args, self._handshake_reply)
        queue, self.queue = self.queue, []
        for args, cb in queue:
            self._write(args, cb)

    def _handshake_reply(self, error: bool, data: bytes) -> None:
        if error:
            log.error("control connection: the upstream refused the proxy's credentials: %s",
                      data[:200].decode("utf-8", "replace").strip())
            self.refused = data  # what the commands that came with it are told
            if self.transport is not None:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            value = self.reader.gets()
            if value is False:
                return
            cb = self.waiting.popleft() if self.waiting else None
            if cb is not None:
                cb(*_reply_bytes(value))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiting, self.waiting = self.waiting, deque()
        why = self.refused or b"-ERR respmeter: control connection lost\r\n"
        for cb in waiting:
            if cb is not None:
                cb(True, why)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
