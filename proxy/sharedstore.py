"""Cap leases shared by many proxies through Redis (``--state-url``).

The SQLite store (proxy.store) keeps the caps exact for the proxies of one host. Here the leases
live in Redis instead, so a fleet shares one budget: each reservation of a block is one atomic Lua
call that never lets the reserved total pass the cap; a block counts as used until it is given
back; a proxy killed with -9 loses at most its unspent blocks (undercount, never overshoot).

Keys carry the window (``day:2026-12-04``, ``month:2026-12``, in the cap's timezone), so there is no
race at midnight, and expire well after it. What this process spent is written there every
``push_every`` seconds (and when it gives budget back), so the fleet's usage is known without a
round trip per command. The same push carries this instance's counts, key patterns and saved
commands since the last one, tagged with its name (the fleet's report), and reads back the fleet's
counts; the local SQLite store keeps them too (a report of the stopped proxy).

The client is synchronous, with short timeouts: a reservation is one round trip on the event loop,
made once per block. When the state store cannot be reached, :class:`StateUnavailable` is raised and
the caller fails closed; from then on nothing waits for the store on the event loop: a thread tries
it every ``RETRY_EVERY`` seconds (:meth:`SyncRedis.probe`) and the calls start again once it
answers, so a store that hangs (accepts connections and never replies, or drops them) holds the
proxy up once, for at most the timeout, not at each try.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
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
RETRY_EVERY = 5.0  # seconds between tries of an unreachable state store (in a thread: see SyncRedis.probe)
PUSH_EVERY = 60.0  # seconds between pushes of what this process spent (and its heartbeat)
# with --state-url upstream: budget of each window set aside for the first state call of instances
# new in it, once the rest is spent (the cap is reached; see CHARGE); at most a tenth of the cap
HEADROOM = 16
SEP = "\x1f"  # between the parts of a traffic hash's field: instance, client, command, pattern or saver
TRAFFIC = ("patterns", "saved", "alive")

# With --state-url upstream, every state command is billed like a client's: each script is paid
# from the global caps (scope ''), in the same script. A proxy pays its next call ahead: each script
# tops up a small "spare" of budget, kept under the instance's name in the lease hash (a restarted
# instance inherits it), and a proxy whose spare cannot pay for another call makes none (its cap
# is reached). The first call of an instance new in a window has no spare: it is paid from what is
# free, else from a headroom the fleet sets aside for such first calls (HEADROOM, that no block
# nor spare may take). Lease fields: owner -> "reserved spent beat closed state_spent";
# "~spare:<instance>" -> its spare; "~boot" -> the headroom used.
CHARGE = b"""
local function lease(lk, owner)
  local v = redis.call('HGET', lk, owner)
  if not v then return 0, 0, 0 end
  local a, b, c = string.match(v, '^(%d+) (%d+) %S+ %d+ ?(%d*)')
  return tonumber(a), tonumber(b), tonumber(c) or 0
end
-- the budget blocks and spares may take: the cap less the headroom not used yet
local function limit(lk, cap, headroom)
  headroom = math.min(headroom, math.floor(cap / 10))
  return cap - math.max(0, headroom - tonumber(redis.call('HGET', lk, '~boot') or '0'))
end
local function charge(lk, total, cap, headroom, cost, target, field)
  local sp = tonumber(redis.call('HGET', lk, field) or '0')
  local pay = math.min(sp, cost)
  sp = sp - pay
  local first = cost - pay
  if first > 0 then
    local free = math.max(0, limit(lk, cap, headroom) - total)
    if first > free then redis.call('HINCRBY', lk, '~boot', first - free) end
    total = total + first
  end
  if target > 0 then
    local top = math.max(0, math.min(target - sp, limit(lk, cap, headroom) - total))
    sp = sp + top
    total = total + top
  end
  redis.call('HSET', lk, field, sp)
  return total, sp
end
"""

# KEYS: (lease hash, reserved total) per want; ARGV: owner, now, ttl, cost, spare target, spare
# field, headroom, then (amount, cap, charged) per want. Returns (grant, spare or -1) per want.
RESERVE = CHARGE + b"""
local owner, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cost, target, field, headroom = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local out = {}
for i = 1, #KEYS / 2 do
  local lk, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local amount, cap, charged = tonumber(ARGV[5 + 3 * i]), tonumber(ARGV[6 + 3 * i]), ARGV[7 + 3 * i] == '1'
  local before = tonumber(redis.call('GET', tk) or '0')
  local total, sp = before, -1
  local r, s, st = lease(lk, owner)
  local top = cap
  if charged then
    total, sp = charge(lk, total, cap, headroom, cost, target, field)
    st = st + cost
    top = limit(lk, cap, headroom)
  end
  local grant = math.max(0, math.min(amount, top - total))
  total = total + grant
  if total ~= before or charged then
    redis.call('SET', tk, total, 'EX', ttl)
    redis.call('HSET', lk, owner, (r + grant) .. ' ' .. s .. ' ' .. now .. ' 0 ' .. st)
    redis.call('EXPIRE', lk, ttl)
  end
  out[i] = {grant, sp}
end
return out
"""

# KEYS: (lease hash, reserved total) per lease, then the traffic hashes; ARGV: owner, now, ttl,
# close (1: give back everything unspent), cost, spare target, spare field, headroom, number of
# leases, then (spent, release, cap, charged) per lease, then the traffic as JSON: "c" (key index,
# field, n) added to counts, "p" (key index, field, n, first, last) merged into "n first last"
# values (key patterns, saved commands, alive spans), "r" key indexes to read back. Returns (spare
# or -1, the lease hash as it is then: the fleet's usage, read in the same call) per lease, then
# the hashes read back.
PUSH = CHARGE + b"""
local owner, now, ttl, close = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local cost, target, field, headroom = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local nl = tonumber(ARGV[9])
local out = {}
for i = 1, nl do
  local lk, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local spent, release = tonumber(ARGV[6 + 4 * i]), tonumber(ARGV[7 + 4 * i])
  local cap, charged = tonumber(ARGV[8 + 4 * i]), ARGV[9 + 4 * i] == '1'
  local before = tonumber(redis.call('GET', tk) or '0')
  local total, sp = before, -1
  local r, s, st = lease(lk, owner)
  if charged then
    -- (a closing proxy tops up nothing: the spare it keeps pays for its instance's next start)
    total, sp = charge(lk, total, cap, headroom, cost, close and 0 or target, field)
    st = st + cost
  end
  if redis.call('HEXISTS', lk, owner) == 1 or charged then
    local keep = r
    if close then keep = spent elseif release > 0 then keep = math.max(spent, r - release) end
    total = total - (r - keep)
    redis.call('HSET', lk, owner, keep .. ' ' .. spent .. ' ' .. now .. ' ' .. (close and '1' or '0') .. ' ' .. st)
    redis.call('EXPIRE', lk, ttl)
  end
  if total ~= before then redis.call('SET', tk, total, 'EX', ttl) end
  out[i] = {sp, redis.call('HGETALL', lk)}
end
local data = cjson.decode(ARGV[10 + 4 * nl])
for _, c in ipairs(data.c) do redis.call('HINCRBY', KEYS[c[1]], c[2], c[3]) end
for _, c in ipairs(data.p) do
  local k, f, n, a, b = KEYS[c[1]], c[2], c[3], c[4], c[5]
  local v = redis.call('HGET', k, f)
  if v then
    local x, y, z = string.match(v, '^(%d+) (%S+) (%S+)')
    n, a, b = n + tonumber(x), math.min(a, tonumber(y)), math.max(b, tonumber(z))
  end
  redis.call('HSET', k, f, string.format('%d %.3f %.3f', n, a, b))
end
for i = 2 * nl + 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
local back = {}
for _, k in ipairs(data.r) do back[#back + 1] = redis.call('HGETALL', KEYS[k]) end
out[nl + 1] = back
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
        self.sent = 0  # commands sent so far (handshakes included)
        self.sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self.address)
            return sock
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or self.address[0])
        return sock

    def _connect(self) -> socket.socket:
        self.sock = self._open()
        for args in self.handshake:
            self._roundtrip(args)
        return self.sock

    def probe(self, commands: bool) -> None:
        """Does the state store answer? A connection of its own (nothing shared with :meth:`call`,
        so a thread may run this), opened and, with ``commands``, sent the handshake and a PING
        (without: TCP and TLS only, when every command is billed). StateUnavailable when not."""
        sock = None
        try:
            sock = self._open()
            if commands:
                for args in [*self.handshake, [b"PING"]]:
                    self._exchange(sock, args)
        except (OSError, StateUnavailable) as exc:
            raise StateUnavailable(str(exc) or exc.__class__.__name__) from None
        finally:
            if sock is not None:
                sock.close()

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
        self.sent += 1
        if self.on_command is not None:
            self.on_command(args[0])
        return self._exchange(self.sock, args)

    @staticmethod
    def _exchange(sock: socket.socket, args: list[bytes]) -> Any:
        sock.sendall(encode_command(args))
        reader = hiredis.Reader()
        while True:
            reply = reader.gets()
            if reply is not False:
                break
            data = sock.recv(65536)
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
    """The Store interface of proxy.store, with the cap leases in Redis (see the module docstring).

    ``billed``: the state store is the upstream (``--state-url upstream``), so each call is paid from
    the global caps set by :meth:`set_charged` (see CHARGE above)."""

    def __init__(
        self,
        link: SyncRedis,
        local: Any,
        *,
        clock: Callable[[], float] = time.time,
        prefix: bytes = b"respmeter:",
        push_every: float = PUSH_EVERY,
        billed: bool = False,
        instance: str = "",
    ) -> None:
        self.link = link
        self.local = local  # proxy.store.Store: counts, patterns, saved, and a copy of the leases
        self.clock = clock
        self.prefix = prefix
        self.push_every = push_every
        self.owner = local.owner
        self.instance = instance or local.owner
        self.refill_window = 120.0  # (proxy.limits: blocks grow while refills are closer than this)
        self.started = local.started
        self.mine: dict[tuple[str, str], int] = {}  # (win, scope) -> what this process spent
        self.pushed_at = 0.0
        self.healthy = True  # the last call to the state store succeeded
        self.failed_at = float("-inf")  # when it failed, or was last tried in a thread since
        self.reason = ""  # why it failed
        self.answered = False  # a thread's try found it answering again: the next flush calls it
        self.probing = False
        self._used: dict[tuple[str, str], tuple[float, Any]] = {}  # (win, scope) -> (when, HGETALL)
        self.billed = billed
        self.charged: dict[str, int] = {}  # win -> the global cap each call is paid from (billed)
        self.spare: dict[str, int] = {}  # win -> this instance's spare there, as last seen
        self.paid = 0  # link.sent already paid for
        self.spare_field = b"~spare:" + self.instance.encode()
        # a call costs 1, and the handshake when it reconnects: the spare pays for one such call
        self.call_cost = 1 + len(link.handshake)
        self.spare_target = self.call_cost + 1
        # traffic not pushed yet: ("counts", win, client, cmd) -> n; ("patterns"|"saved", win, client,
        # cmd, pattern|saver) -> [n, first, last]
        self.pending: dict[tuple[str, ...], Any] = {}
        self.current: list[str] = []  # the current windows' ids (proxy.limits, at each rollover)
        self._fleet_counts: dict[str, dict[tuple[str, str], int]] = {}  # win -> fleet's counts at the last push
        self.headroom = HEADROOM

    def _keys(self, win: str, scope: str) -> tuple[bytes, bytes]:
        tail = f"{win}:{scope}".encode()
        return self.prefix + b"lease:" + tail, self.prefix + b"total:" + tail

    # -- paying for the state calls (billed) --------------------------------------------------------
    def set_charged(self, caps: dict[str, int], current: list[str] = ()) -> None:
        """The current windows, and those (win id -> global cap) a billed call is paid from
        (proxy.limits, at each rollover)."""
        self.charged = dict(caps)
        self.current = list(current) or list(caps)
        self._fleet_counts = {w: c for w, c in self._fleet_counts.items() if w in self.current}
        self.spare = {w: n for w, n in self.spare.items() if w in caps}

    def _cost(self) -> int:
        """What the next call costs: itself, a reconnection's handshake, and sends not paid yet."""
        return 1 + (0 if self.link.sock is not None else len(self.link.handshake)) + self.link.sent - self.paid

    def affordable(self) -> bool:
        """False when this instance's spare cannot pay for another call (its caps are reached)."""
        if not self.billed:
            return True
        cost = self._cost()
        return all(self.spare.get(w, cost) >= cost for w in self.charged)

    def _eval(self, script: bytes, keys: list[bytes], args: list[Any]) -> Any:
        try:
            out = self.link.call(b"EVAL", script, len(keys), *keys, *args)
        except StateUnavailable as exc:
            self._failed(str(exc))
            raise
        self.paid = self.link.sent
        self.healthy = True
        return out

    def _failed(self, reason: str) -> None:
        self.healthy = False
        self.failed_at = self.clock()
        self.reason = reason

    def _down(self) -> StateUnavailable:
        """What a call gets while the store is unreachable: it is not tried on the event loop."""
        return StateUnavailable(self.reason or "the shared state store is unreachable")

    def _retry(self) -> None:
        """The store is unreachable: try it again in a thread (a store that hangs must not hold the
        event loop up at each try); :meth:`flush` calls it once that finds it answering."""
        if self.probing:
            return
        self.probing = True
        self.failed_at = self.clock()

        def run() -> None:
            try:
                self.link.probe(commands=not self.billed)  # (billed: no command the caps did not pay)
                self.answered = True
            except StateUnavailable as exc:
                self.reason = str(exc)
            finally:
                self.probing = False

        threading.Thread(target=run, name="respmeter-state-probe", daemon=True).start()

    def _charge_args(self) -> list[Any]:
        if not self.billed:
            return [0, 0, b"", 0]
        return [self._cost(), self.spare_target, self.spare_field, self.headroom]

    def _with_charged(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``items`` and the global leases a billed call is paid from, when missing."""
        if not self.billed:
            return items
        have = set(items)
        return items + [(w, "") for w in self.charged if (w, "") not in have]

    def _is_charged(self, win: str, scope: str) -> int:
        return 1 if self.billed and scope == "" and win in self.charged else 0

    # -- leases --------------------------------------------------------------------------------------
    def reserve(self, wants: list[tuple[str, str, int, int]]) -> list[int]:
        if not self.healthy:
            raise self._down()
        if not self.affordable():
            return [0] * len(wants)  # (another call would pass the cap it would be paid from)
        asked = {(w, s): (n, cap) for w, s, n, cap in wants}
        items = self._with_charged([(w, s) for w, s, _, _ in wants])
        keys: list[bytes] = []
        args: list[Any] = [self.owner, repr(self.clock()), TTL, *self._charge_args()]
        for win, scope in items:
            amount, cap = asked.get((win, scope), (0, self.charged.get(win, 0)))
            keys.extend(self._keys(win, scope))
            args.extend((amount, cap, self._is_charged(win, scope)))
            self.mine.setdefault((win, scope), 0)
        out = self._eval(RESERVE, keys, args)
        for (win, scope), (_, sp) in zip(items, out):
            if sp >= 0:
                self.spare[win] = int(sp)
        grants = [int(g) for g, _ in out[: len(wants)]]
        # (the local copy keeps this process's own view for a report of the stopped proxy)
        self.local.reserve([(w, s, g, 1 << 62) for (w, s, _, _), g in zip(wants, grants)])
        return grants

    def flush(self, spent: Any, counts: Any = (), patterns: Any = (), release: Any = (), saved: Any = ()) -> None:
        spent = list(spent)
        release = list(release)
        counts, patterns, saved = list(counts), list(patterns), list(saved)
        self.local.flush(spent, counts, patterns, release, saved)
        for win, client, cmd, n in counts:
            self._pend(("counts", win, client, cmd), n)
        # (key patterns and saved commands: the day's, for the report)
        for kind, rows in (("patterns", patterns), ("saved", saved)):
            for win, client, cmd, what, n, first, last in rows:
                if win.startswith("day:"):
                    self._pend((kind, win, client, cmd, what), [n, first, last])
        for win, scope, n in spent:
            self.mine[(win, scope)] = n
        now = self.clock()
        if self.healthy:
            due = now - self.pushed_at >= self.push_every
        else:
            due, self.answered = self.answered, False
            if not due:
                if now - self.failed_at >= RETRY_EVERY:
                    self._retry()
                return  # (what was spent is pushed once the store answers again)
        if (release or due) and self.affordable():
            rel = {(w, s): n for w, s, n in release}
            was = self.healthy
            try:
                self._push(rel, close=False)
            except StateUnavailable as exc:
                if was:
                    log.error("shared state store unreachable: %s", exc)
                return
            if not was:
                self.healthy = True  # (also when there was nothing to push: it answered the try)
                log.warning("shared state store reachable again")
            # windows that ended went back above (their release): no need to push them again
            current = {(w, sc) for w, sc, _ in spent}
            self.mine = {k: v for k, v in self.mine.items() if k in current}

    def _push(self, rel: dict[tuple[str, str], int], close: bool, read: tuple[str, ...] = ()) -> list[Any]:
        """Push what this process spent and its traffic since the last push; read back the fleet's
        counts of the current windows and the traffic hashes of the windows in ``read``."""
        if not self.mine and not self.pending and not read:
            return []
        items = self._with_charged(list(self.mine))
        keys: list[bytes] = []
        args: list[Any] = [self.owner, repr(self.clock()), TTL, 1 if close else 0, *self._charge_args(), len(items)]
        for win, scope in items:
            keys.extend(self._keys(win, scope))
            args.extend((self.mine.get((win, scope), 0), rel.get((win, scope), 0), self.charged.get(win, 0),
                         self._is_charged(win, scope)))
        index: dict[bytes, int] = {}

        def key(kind: str, win: str) -> int:
            k = self.prefix + f"{kind}:{win}".encode()
            if k not in index:
                keys.append(k)
                index[k] = len(keys)
            return index[k]

        now = self.clock()
        data: dict[str, list[Any]] = {"c": [], "p": [], "r": []}
        pending = self.pending
        for (kind, win, *parts), v in pending.items():
            field = SEP.join((self.instance, *parts))
            if kind == "counts":
                data["c"].append((key(kind, win), field, v))
            else:
                data["p"].append((key(kind, win), field, *v))
        for win in self.current:
            data["p"].append((key("alive", win), self.instance, 1, self.started, now))
        reads = [("counts", w) for w in self.current] + [(k, w) for w in read for k in TRAFFIC]
        data["r"] = [key(kind, win) for kind, win in reads]
        args.append(json.dumps(data, separators=(",", ":")))
        self.pending = {}
        try:
            out = self._eval(PUSH, keys, args)
        except StateUnavailable:
            for k, v in pending.items():  # (pushed again next time)
                self._pend(k, v)
            raise
        self.pushed_at = now = self.clock()
        for (win, scope), (sp, raw) in zip(items, out):
            if sp >= 0:
                self.spare[win] = int(sp)
            self._used[(win, scope)] = (now, raw)  # (usage is read with the push: no call of its own)
        back = dict(zip(reads, out[len(items)]))
        for (kind, win), raw in back.items():
            if kind == "counts":
                fleet: dict[tuple[str, str], int] = {}
                for i in range(0, len(raw), 2):
                    _, client, cmd = raw[i].decode().split(SEP, 2)
                    fleet[(client, cmd)] = fleet.get((client, cmd), 0) + int(raw[i + 1])
                self._fleet_counts[win] = fleet
        return [back.get((k, w), []) for w in read for k in TRAFFIC]

    def _pend(self, key: tuple[str, ...], v: Any) -> None:
        if key[0] == "counts":
            self.pending[key] = self.pending.get(key, 0) + v
            return
        had = self.pending.get(key)
        self.pending[key] = v if had is None else [had[0] + v[0], min(had[1], v[1]), max(had[2], v[2])]

    # -- the fleet's traffic -------------------------------------------------------------------------
    def fleet_traffic(self, win: str) -> dict[str, Any]:
        """The fleet's key-pattern counts, saved commands and alive spans of ``win``, per instance
        (what this process has not pushed yet is pushed first, in the same call)."""
        if not self.healthy:
            raise self._down()
        if not self.affordable():
            raise StateUnavailable("the cap is reached: reading the fleet's traffic would pass it")
        patterns, saved, alive = self._push({}, close=False, read=(win,))
        out: dict[str, Any] = {"patterns": [], "saved": [], "alive": {}}
        for rows, raw in (("patterns", patterns), ("saved", saved)):
            for i in range(0, len(raw), 2):
                inst, client, cmd, what = raw[i].decode().split(SEP, 3)
                n, first, last = raw[i + 1].split()
                out[rows].append((inst, client, cmd, what, int(n), float(first), float(last)))
        for i in range(0, len(alive), 2):
            _, first, last = alive[i + 1].split()
            out["alive"][alive[i].decode()] = (float(first), float(last))
        return out

    def close_leases(self) -> None:
        self.local.close_leases()
        if not self.affordable():
            return  # (its blocks count as used until the window ends)
        try:
            self._push({}, close=True)
        except StateUnavailable:
            pass  # (unreachable at exit: its blocks count as used until the window ends)

    def used(self, win: str, scope: str, own_spent: int | None = None) -> int:
        """The fleet's usage of a window: live proxies' spent, dead or closed ones' reserved, and
        the state commands each paid for (this process's own spent as it is now)."""
        lk, _ = self._keys(win, scope)
        now = self.clock()
        cached = self._used.get((win, scope))
        if cached is not None and (now - cached[0] < 2 * self.push_every or self.billed):
            raw = cached[1]  # (from the last push: a scrape must not cost a state call, billed with upstream)
        elif self.billed or not self.healthy:
            return self.local.used(win, scope, own_spent)
        else:
            try:
                raw = self.link.call(b"HGETALL", lk)
            except StateUnavailable as exc:
                self._failed(str(exc))
                return self.local.used(win, scope, own_spent)
            self._used[(win, scope)] = (now, raw)
        total = 0
        seen = False
        for i in range(0, len(raw), 2):
            owner = raw[i].decode()
            if owner.startswith("~"):
                continue  # (an instance's spare: reserved, not used)
            r, s, beat, closed, *rest = raw[i + 1].split()
            st = int(rest[0]) if rest else 0
            if owner == self.owner and own_spent is not None:
                total += own_spent + st
                seen = True
            elif closed == b"1" or now - float(beat) >= DEAD_AFTER:
                total += int(r) + st
            else:
                total += int(s) + st
        if not seen and own_spent:
            total += own_spent
        return total

    # -- the rest stays local ----------------------------------------------------------------------
    def scopes(self, win: str) -> list[str]:
        return self.local.scopes(win)

    def counts(self, win: str) -> Any:
        """The fleet's counts (client, command) -> n of ``win``, as of the last push, with what this
        process counted since; this instance's alone before the first push."""
        fleet = self._fleet_counts.get(win)
        if fleet is None:
            return self.local.counts(win)
        out = dict(fleet)
        for (kind, w, *parts), n in self.pending.items():
            if kind == "counts" and w == win:
                out[(parts[0], parts[1])] = out.get((parts[0], parts[1]), 0) + n
        return out

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
