"""Cap leases shared by many proxies through Redis (``--state-url``).

The SQLite store (proxy.store) keeps the caps exact for the proxies of one host. Here the leases
live in Redis instead, so a fleet shares one budget: each reservation of a block is one atomic Lua
call that never lets the reserved total pass the cap; a block counts as used until it is given
back; a proxy killed with -9 loses at most its unspent blocks (undercount, never overshoot).

Keys carry the window (``day:2026-12-04``, ``month:2026-12``, in the cap's timezone), so there is no
race at midnight, and expire well after it. What this process spent is written there every
``push_every`` seconds (and when it gives budget back), so the fleet's usage is known without a
round trip per command. Everything else (counts, key patterns, saved commands) stays in the local
SQLite store of this instance.

The client is synchronous, with short timeouts: a reservation is one round trip on the event loop,
made once per block. When the state store cannot be reached, :class:`StateUnavailable` is raised and
the caller fails closed.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import hiredis
import logging

from .resp import encode_command
from .store import StateUnavailable

log = logging.getLogger("respmeter.state")

TTL = 40 * 86400  # seconds a window's keys outlive their last write (longer than any window)
DEAD_AFTER = 180.0  # seconds without a push before another proxy's lease counts as dead (all used)
RETRY_EVERY = 5.0  # seconds between tries of an unreachable state store (each may block up to its timeout)
PUSH_EVERY = 60.0  # seconds between pushes of what this process spent (and its heartbeat)

# KEYS: (lease hash, reserved total) per want; ARGV: owner, now, ttl, then (amount, cap) per want
RESERVE = b"""
local owner, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS / 2 do
  local lk, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local amount, cap = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local total = tonumber(redis.call('GET', tk) or '0')
  local grant = math.max(0, math.min(amount, cap - total))
  if grant > 0 then
    redis.call('INCRBY', tk, grant)
    local r, s = 0, 0
    local v = redis.call('HGET', lk, owner)
    if v then
      local a, b = string.match(v, '^(%d+) (%d+)')
      r, s = tonumber(a), tonumber(b)
    end
    redis.call('HSET', lk, owner, (r + grant) .. ' ' .. s .. ' ' .. now .. ' 0')
    redis.call('EXPIRE', lk, ttl)
    redis.call('EXPIRE', tk, ttl)
  end
  out[i] = grant
end
return out
"""

# KEYS as RESERVE; ARGV: owner, now, ttl, close (1: give back everything unspent), then (spent,
# release) per lease. Returns every lease hash as it is then (the fleet's usage, read in the same call)
PUSH = b"""
local owner, now, ttl, close = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local out = {}
for i = 1, #KEYS / 2 do
  local lk, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local spent, release = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local v = redis.call('HGET', lk, owner)
  if v then
    local a = string.match(v, '^(%d+)')
    local r = tonumber(a)
    local keep = r
    if close then keep = spent elseif release > 0 then keep = math.max(spent, r - release) end
    if keep < r then redis.call('DECRBY', tk, r - keep) end
    redis.call('HSET', lk, owner, keep .. ' ' .. spent .. ' ' .. now .. ' ' .. (close and '1' or '0'))
    redis.call('EXPIRE', lk, ttl)
    redis.call('EXPIRE', tk, ttl)
  end
  out[i] = redis.call('HGETALL', lk)
end
return out
"""


class SyncRedis:
    """A minimal blocking RESP client with short timeouts, for the state store."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        *,
        handshake: list[list[bytes]] = (),
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 2.0,
        on_command: Callable[[bytes], None] | None = None,
    ) -> None:
        self.address = address
        self.handshake = list(handshake)
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.timeout = timeout
        self.on_command = on_command  # told the name of every command sent (billing, when upstream)
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self.address)
        else:
            sock = socket.create_connection(self.address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or self.address[0])
        self.sock = sock
        for args in self.handshake:
            self._roundtrip(args)
        return sock

    def call(self, *args: bytes | str | int) -> Any:
        """Send one command and return its reply; StateUnavailable on any failure (and reconnect next
        time)."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        try:
            if self.sock is None:
                self._connect()
            return self._roundtrip(parts)
        except (OSError, StateUnavailable) as exc:
            self.close()
            raise StateUnavailable(str(exc) or exc.__class__.__name__) from None

    def _roundtrip(self, args: list[bytes]) -> Any:
        assert self.sock is not None
        if self.on_command is not None:
            self.on_command(args[0])
        self.sock.sendall(encode_command(args))
        reader = hiredis.Reader()
        while True:
            reply = reader.gets()
            if reply is not False:
                break
            data = self.sock.recv(65536)
            if not data:
                raise StateUnavailable("the state store closed the connection")
            reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise StateUnavailable(f"the state store refused {args[0].decode(errors='replace')}: {reply}")
        return reply

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


class SharedStore:
    """The Store interface of proxy.store, with the cap leases in Redis (see the module docstring)."""

    def __init__(
        self,
        link: SyncRedis,
        local: Any,
        *,
        clock: Callable[[], float] = time.time,
        prefix: bytes = b"respmeter:",
        push_every: float = PUSH_EVERY,
    ) -> None:
        self.link = link
        self.local = local  # proxy.store.Store: counts, patterns, saved, and a copy of the leases
        self.clock = clock
        self.prefix = prefix
        self.push_every = push_every
        self.owner = local.owner
        self.refill_window = 120.0  # (proxy.limits: blocks grow while refills are closer than this)
        self.started = local.started
        self.mine: dict[tuple[str, str], int] = {}  # (win, scope) -> what this process spent
        self.pushed_at = 0.0
        self.healthy = True  # the last call to the state store succeeded
        self.failed_at = float("-inf")
        self._used: dict[tuple[str, str], tuple[float, Any]] = {}  # (win, scope) -> (when, HGETALL)

    def _keys(self, win: str, scope: str) -> tuple[bytes, bytes]:
        tail = f"{win}:{scope}".encode()
        return self.prefix + b"lease:" + tail, self.prefix + b"total:" + tail

    def _eval(self, script: bytes, keys: list[bytes], args: list[Any]) -> Any:
        try:
            out = self.link.call(b"EVAL", script, len(keys), *keys, *args)
        except StateUnavailable:
            self.healthy = False
            self.failed_at = self.clock()
            raise
        self.healthy = True
        return out

    # -- leases --------------------------------------------------------------------------------------
    def reserve(self, wants: list[tuple[str, str, int, int]]) -> list[int]:
        keys: list[bytes] = []
        args: list[Any] = [self.owner, repr(self.clock()), TTL]
        for win, scope, amount, cap in wants:
            keys.extend(self._keys(win, scope))
            args.extend((amount, cap))
            self.mine.setdefault((win, scope), 0)
        grants = [int(g) for g in self._eval(RESERVE, keys, args)]
        # (the local copy keeps this process's own view for a report of the stopped proxy)
        self.local.reserve([(w, s, g, 1 << 62) for (w, s, _, _), g in zip(wants, grants)])
        return grants

    def flush(self, spent: Any, counts: Any = (), patterns: Any = (), release: Any = (), saved: Any = ()) -> None:
        spent = list(spent)
        release = list(release)
        self.local.flush(spent, counts, patterns, release, saved)
        for win, scope, n in spent:
            self.mine[(win, scope)] = n
        now = self.clock()
        if self.healthy:
            due = now - self.pushed_at >= self.push_every
        else:
            due = now - self.failed_at >= RETRY_EVERY  # (each try may block up to the timeout)
        if release or due:
            rel = {(w, s): n for w, s, n in release}
            was = self.healthy
            try:
                self._push(rel, close=False)
            except StateUnavailable as exc:
                if was:
                    log.error("shared state store unreachable: %s", exc)
                return
            if not was:
                log.warning("shared state store reachable again")
            # windows that ended went back above (their release): no need to push them again
            current = {(w, sc) for w, sc, _ in spent}
            self.mine = {k: v for k, v in self.mine.items() if k in current}

    def _push(self, rel: dict[tuple[str, str], int], close: bool) -> None:
        if not self.mine:
            return
        keys: list[bytes] = []
        args: list[Any] = [self.owner, repr(self.clock()), TTL, 1 if close else 0]
        for (win, scope), n in self.mine.items():
            keys.extend(self._keys(win, scope))
            args.extend((n, rel.get((win, scope), 0)))
        leases = self._eval(PUSH, keys, args)
        self.pushed_at = now = self.clock()
        for key, raw in zip(self.mine, leases):
            self._used[key] = (now, raw)  # (usage is read with the push: no call of its own)

    def close_leases(self) -> None:
        self.local.close_leases()
        try:
            self._push({}, close=True)
        except StateUnavailable:
            pass  # (unreachable at exit: its blocks count as used until the window ends)

    def used(self, win: str, scope: str, own_spent: int | None = None) -> int:
        """The fleet's usage of a window: live proxies' spent, dead or closed ones' reserved (this
        process's own spent as it is now)."""
        lk, _ = self._keys(win, scope)
        now = self.clock()
        cached = self._used.get((win, scope))
        if cached is not None and now - cached[0] < 2 * self.push_every:
            raw = cached[1]  # (from the last push: a scrape must not cost a state call, billed with upstream)
        elif not self.healthy and now - self.failed_at < RETRY_EVERY:
            return self.local.used(win, scope, own_spent)
        else:
            try:
                raw = self.link.call(b"HGETALL", lk)
                self.healthy = True
            except StateUnavailable:
                self.healthy = False
                self.failed_at = now
                return self.local.used(win, scope, own_spent)
            self._used[(win, scope)] = (now, raw)
        total = 0
        for i in range(0, len(raw), 2):
            owner = raw[i].decode()
            r, s, beat, closed = raw[i + 1].split()
            if owner == self.owner and own_spent is not None:
                total += own_spent
            elif closed == b"1" or now - float(beat) >= DEAD_AFTER:
                total += int(r)
            else:
                total += int(s)
        if self.owner not in (raw[i].decode() for i in range(0, len(raw), 2)) and own_spent:
            total += own_spent
        return total

    # -- the rest stays local ----------------------------------------------------------------------
    def scopes(self, win: str) -> list[str]:
        return self.local.scopes(win)

    def counts(self, win: str) -> Any:
        return self.local.counts(win)

    def patterns(self, win: str) -> Any:
        return self.local.patterns(win)

    def saved(self, win: str) -> Any:
        return self.local.saved(win)

    def alive_spans(self) -> Any:
        return self.local.alive_spans()

    def windows(self) -> Any:
        return self.local.windows()

    def close(self) -> None:
        self.local.close()
        self.link.close()
