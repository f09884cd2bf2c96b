"""Caps and rate limits: plain objects with an injected clock.

Caps count upstream (billable) commands, the proxy's own included, per day and per month, globally
and per client identity, in a configurable timezone. Budget comes from :class:`proxy.store.Store` in
durable blocks; each command spends one token locally, so the hot path is a few integer operations.

Rate limits are token buckets per (rule, client identity). ``delay`` holds the command (and, to keep
order, every later command of that connection) until a token is free; ``reject`` answers an error.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from .paths import BLOCKING, block_timeout
from .resp import encode_command, encode_error
from .savedcounts import saved_window
from .store import StateUnavailable
from .entries import Admission
from .session import Session

log = logging.getLogger("respmeter.limits")

WINDOWS = ("daily", "monthly")
MIN_BLOCK = 16
MAX_BLOCK = 4096

class LimitsConfigError(ValueError):
    pass


def parse_rate(text: str) -> float:
    """'10/s', '600/min', '6/m', '100/h', '1000/day' -> tokens per second."""
    units = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
    num, sep, unit = str(text).partition("/")
    try:
        n = float(num)
    except ValueError:
        raise LimitsConfigError(f"rate {text!r}: expected N/UNIT such as '10/s' or '600/min'") from None
    if not sep or unit.strip().lower() not in units:
        raise LimitsConfigError(f"rate {text!r}: unit must be one of s, min, h, day")
    if n <= 0:
        raise LimitsConfigError(f"rate {text!r}: must be positive")
    return n / units[unit.strip().lower()]


@dataclass
class RateRule:
    name: str
    rate: float  # tokens per second
    burst: float = 1.0
    client: str = "*"  # glob on the client identity
    command: str = "*"  # glob on the command name (commandstats naming: brpop, client|setname)
    action: str = "delay"  # delay | reject
    max_queue: int = 1000

    def matches_client(self, client: str) -> bool:
        return fnmatch.fnmatchcase(client, self.client)

    def matches(self, client: str, command: str) -> bool:
        return fnmatch.fnmatchcase(client, self.client) and fnmatch.fnmatchcase(command, self.command)


@dataclass
class CapConfig:
    daily: int | None = None
    monthly: int | None = None
    clients: dict[str, dict[str, int]] = field(default_factory=dict)  # identity -> {daily, monthly}
    timezone: str = "UTC"
    on_cap: str = "error"  # error | idle

    @property
    def any(self) -> bool:
        return bool(self.daily or self.monthly or any(self.clients.values()))


class Pool:
    """Budget of one (window, scope) that this process holds."""

    __slots__ = ("window", "scope", "cap", "win_id", "tokens", "spent", "reserved", "block", "dry_until", "refills")

    def __init__(self, window: str, scope: str, cap: int, win_id: str) -> None:
        self.window = window  # daily | monthly
        self.scope = scope  # '' for all clients
        self.cap = cap
        self.win_id = win_id  # day:2026-11-25 | month:2026-11
        self.tokens = 0
        self.spent = 0
        self.reserved = 0
        self.block = MIN_BLOCK
        self.dry_until = 0.0  # the cap was reached: do not ask the store again before this
        self.refills: list[float] = []


@dataclass
class Bucket:
    tokens: float
    at: float


class Limits:
    def __init__(
        self,
        caps: CapConfig,
        rules: list[RateRule],
        store: Any,
        *,
        clock: Callable[[], float] = time.time,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        stats: Any = None,
        handshake: Any = None,
        fail_closed: bool = True,
    ) -> None:
        self.fail_closed = fail_closed  # --state-fail closed: refuse while the shared store is down
        self.caps = caps
        self.rules = rules
        self.store = store
        self.clock = clock
        self.call_later = call_later
        self.stats = stats
        self.handshake = handshake  # proxy.handshake.HandshakeBook: the handshake at the cap
        self.tz = ZoneInfo(caps.timezone)
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.throttled: dict[tuple[str, str], int] = {}  # (rule, action) -> count
        self._rules_for: dict[tuple[str, str], list[RateRule]] = {}
        self._client_ruled: dict[str, bool] = {}
        self._pools: dict[str, Pool] = {}  # key: window|scope
        self._client_pools: dict[str, list[Pool]] = {}
        self.next_reset = 0.0
        # no cap and no rate rule: every command may go (the gate's fast path asks no more than
        # the window rollover of this; see fast_admit)
        self.free = not rules and not caps.any
        self.win_ids: dict[str, str] = {}
        self.bounds: dict[str, tuple[float, float]] = {}  # window -> (start, end) unix time
        self._counted: dict[tuple[str, str], int] = {}  # stats.upstream already flushed
        if stats is not None:
            # the identities the policy is keyed on keep their label however many names came first
            exact = [r.client for r in rules if not any(c in r.client for c in "*?[")]
            globs = [r.client for r in rules if any(c in r.client for c in "*?[")]
            stats.labels.keep([*caps.clients, *exact], globs)
        self._rollover(self.clock())

    # -- windows ----------------------------------------------------------------------------------
    def window_bounds(self, now: float) -> dict[str, tuple[str, float, float]]:
        t = dt.datetime.fromtimestamp(now, self.tz)
        day0 = dt.datetime(t.year, t.month, t.day, tzinfo=self.tz)
        nd = (day0 + dt.timedelta(days=1)).date()
        day1 = dt.datetime(nd.year, nd.month, nd.day, tzinfo=self.tz)
        m0 = dt.datetime(t.year, t.month, 1, tzinfo=self.tz)
        m1 = dt.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=self.tz)
        return {
            "daily": (f"day:{day0.date().isoformat()}", day0.timestamp(), day1.timestamp()),
            "monthly": (f"month:{t.year:04d}-{t.month:02d}", m0.timestamp(), m1.timestamp()),
        }

    def _rollover(self, now: float) -> None:
        old = dict(self.win_ids)
        if old and self.store is not None:
            self.flush(release=True)
        b = self.window_bounds(now)
        self.win_ids = {w: b[w][0] for w in WINDOWS}
        self.bounds = {w: (b[w][1], b[w][2]) for w in WINDOWS}
        self.next_reset = min(b[w][2] for w in WINDOWS)
        if hasattr(self.store, "set_charged"):  # (a shared store billed by the upstream pays its calls from these)
            self.store.set_charged({self.win_ids[w]: getattr(self.caps, w) for w in WINDOWS if getattr(self.caps, w)},
                                   [self.win_ids[w] for w in WINDOWS])
        # pools of windows that ended are dropped (their unspent budget was released above)
        self._pools = {k: p for k, p in self._pools.items() if p.win_id == self.win_ids[p.window]}
        self._client_pools.clear()
        if old:
            log.info("cap windows now %s", ", ".join(self.win_ids.values()))

    def reset_iso(self, window: str) -> str:
        return dt.datetime.fromtimestamp(self.bounds[window][1], self.tz).isoformat()

    # -- pools ----------------------------------------------------------------------------------------
    def _pool(self, window: str, scope: str, cap: int) -> Pool:
        key = f"{window}|{scope}"
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = Pool(window, scope, cap, self.win_ids[window])
        return p

    def pools_for(self, client: str) -> list[Pool]:
        pools = self._client_pools.get(client)
        if pools is None:
            pools = []
            c = self.caps
            for window in WINDOWS:
                cap = getattr(c, window)
                if cap:
                    pools.append(self._pool(window, "", cap))
                ccap = c.clients.get(client, {}).get(window)
                if ccap:
                    pools.append(self._pool(window, client, ccap))
            self._client_pools[client] = pools
        return pools

    def _refill(self, pools: list[Pool], need: int) -> Pool | None:
        """Top up pools short of ``need`` tokens. Returns the pool whose cap stops it, or None."""
        now = self.clock()
        short = [p for p in pools if p.tokens < need]
        if not short:
            return None
        for p in short:
            if p.dry_until > now:
                return p
        if self.store is None:
            for p in short:  # no store: in-memory caps
                grant = max(0, min(p.block, p.cap - p.reserved))
                p.tokens += grant
                p.reserved += grant
        else:
            wants = []
            # a shared store (proxy.sharedstore) is a network round trip away: blocks grow until
            # refills are minutes apart, not a second
            window = getattr(self.store, "refill_window", 1.0)
            for p in short:
                # adaptive block: larger when refills come often, so the store is not a bottleneck
                p.refills = [t for t in p.refills if now - t < window] + [now]
                if len(p.refills) > 4 and p.block < MAX_BLOCK:
                    p.block *= 2
                elif len(p.refills) == 1 and p.block > MIN_BLOCK:
                    p.block //= 2
                block = min(max(p.block, need - p.tokens), max(1, p.cap // 50))
                wants.append((p.win_id, p.scope, max(block, need - p.tokens), p.cap))
            grants = self.store.reserve(wants)
            for p, g in zip(short, grants):
                p.tokens += g
                p.reserved += g
        for p in short:
            if p.tokens < need:
                p.dry_until = now + 1.0  # another process may give budget back: look again later
                return p
        return None

    def _take(self, pools: list[Pool], n: int) -> Pool | None:
        if any(p.tokens < n for p in pools):
            stop = self._refill(pools, n)
            if stop is not None:
                return stop
        for p in pools:
            p.tokens -= n
            p.spent += n
        return None

    def take(self, client: str, n: int) -> bool:
        """Budget for ``n`` commands the proxy sends for ``client`` on its own (proxy.pollhold,
        proxy.control): False when a cap (or an unreadable state store) stops them."""
        now = self.clock()
        if now >= self.next_reset:
            self._rollover(now)
        pools = self.pools_for(client)
        if not pools:
            return True
        return self._take_recorded(pools, n) is None

    def refund(self, client: str, n: int) -> None:
        for p in self.pools_for(client):
            p.tokens += n
            p.spent -= n

    def cap_error(self, p: Pool) -> bytes:
        who = f" for client {p.scope}" if p.scope else ""
        return encode_error(
            f"ERR respmeter: {p.window} cap of {p.cap} commands{who} reached, resets at {self.reset_iso(p.window)}"
        )

    # -- the Session policy protocol (called through proxy.gate.Gate) ------------------------------
    def init_session(self, session: Session) -> None:
        session.tx_spare = 0
        session.tx_doomed = False
        session.idle_until = None
        session.on_close.append(lambda: self._session_closed(session))

    def _session_closed(self, session: Session) -> None:
        self._release_spare(session)

    def _release_spare(self, session: Session) -> None:
        """Give the budget kept for an EXEC that will not come back to the identity it came from."""
        if session.tx_spare:
            self.refund(session.tx_spare_client, session.tx_spare)
            session.tx_spare = 0
        session.tx_doomed = False

    def _ruled(self, client: str) -> bool:
        r = self._client_ruled.get(client)
        if r is None:
            r = self._client_ruled[client] = any(rule.matches_client(client) for rule in self.rules)
        return r

    def fast_admit(self, session: Session, n: int) -> bool:
        now = self.clock()
        if now >= self.next_reset:
            self._rollover(now)
        client = session.client
        if self.rules and self._ruled(client):
            return False
        pools = self._client_pools.get(client)
        if pools is None:
            pools = self.pools_for(client)
        if not pools:
            return True
        if self.state_down:
            return False
        for p in pools:
            if p.tokens < n:
                return False
        for p in pools:
            p.tokens -= n
            p.spent += n
        return True

    def fast_refund(self, session: Session, n: int) -> None:
        if n:
            self.refund(session.client, n)

    def admit(self, session: Session, args: list[bytes], info: Any, name: str, extra: int) -> tuple[int, Any, str] | None:
        """None to forward; otherwise a verdict. ``extra``: the proxy's own commands that go with it."""
        now = self.clock()
        if now >= self.next_reset:
            self._rollover(now)
        client = session.client
        if self.state_down and self.pools_for(client):
            return self._state_unavailable("the shared state store is unreachable")
        # rate limits first: a delayed command must not hold cap budget while it waits
        if self.rules:
            verdict = self._rate(session, client, name, now)
            if verdict is not None:
                return verdict
        pools = self.pools_for(client)
        if not pools:
            return None
        # MULTI keeps one token aside so its EXEC/DISCARD can always be sent: a transaction is
        # never left half-applied by the cap.
        if name == "reset" and session.tx_spare:
            self._release_spare(session)  # RESET discards the transaction at once
        if name in ("exec", "discard") and session.tx_spare:
            session.tx_spare = 0
            need = extra
            if session.tx_doomed:
                session.tx_doomed = False
                if name == "exec":
                    discard = session.push_internal([b"DISCARD"], None)
                    self._tx_cap_error(session)  # (counted)
                    return Admission.INJECT_REPLY, (discard, encode_error(
                        "EXECABORT Transaction discarded: respmeter cap reached while queueing"), "rejected:cap"), ""
        elif session.multi_view and session.tx_doomed:
            return Admission.REPLY, self._tx_cap_error(session), "rejected:cap"
        elif name == "multi" and not session.multi_view:
            need = 2 + extra
        else:
            need = 1 + extra
        if need:
            stop = self._take_recorded(pools, need)
            if isinstance(stop, tuple):
                return stop
            if stop is not None:
                if session.multi_view and name not in ("exec", "discard"):
                    session.tx_doomed = True
                return self._capped(session, args, name, stop, now)
        if name == "multi" and not session.multi_view:
            session.tx_spare = 1
            session.tx_spare_client = client
        return None

    def charge(self, session: Session, n: int, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        """Budget for ``n`` commands the proxy sends on its own, ahead of the client's command
        ``args`` (which is admitted on its own later). None, or the verdict for that command."""
        now = self.clock()
        if now >= self.next_reset:
            self._rollover(now)
        pools = self.pools_for(session.client)
        if not pools:
            return None
        stop = self._take_recorded(pools, n)
        if isinstance(stop, tuple):
            return stop
        return None if stop is None else self._capped(session, args, name, stop, now)

    def _take_recorded(self, pools: list[Pool], n: int) -> Pool | tuple[int, Any, str] | None:
        """_take, failing closed: a command whose budget cannot be recorded is not sent (the
        verdict for it), rather than sent uncounted."""
        try:
            return self._take(pools, n)
        except (sqlite3.Error, StateUnavailable) as exc:
            log.error("usage state unavailable: %s", exc)
            return self._state_unavailable(str(exc))

    def _state_unavailable(self, why: str) -> tuple[int, Any, str]:
        return Admission.REPLY, encode_error(
            f"ERR respmeter: usage state unavailable ({why}); command not sent, try again"
        ), "rejected:state_unavailable"

    @property
    def state_down(self) -> bool:
        """The shared state store failed its last call and the caps fail closed (--state-fail)."""
        return self.fail_closed and not getattr(self.store, "healthy", True)

    def _tx_cap_error(self, session: Session) -> bytes:
        """A command of a transaction the cap doomed is refused: the error, counted by window."""
        for p in self.pools_for(session.client):
            if p.tokens <= 0:
                self._count_cap(p.window)
                return self.cap_error(p)
        return encode_error("ERR respmeter: cap reached, transaction will be discarded")

    def _count_cap(self, window: str) -> None:
        # respmeter_cap_rejections_total: what was refused (as rejections_total{reason="cap"}); not
        # what the proxy answered itself at the cap, nor a command held for the reset
        if self.stats is not None:
            self.stats.cap_rejections[window] = self.stats.cap_rejections.get(window, 0) + 1

    def _capped(self, session: Session, args: list[bytes], name: str, pool: Pool, now: float) -> tuple[int, Any, str]:
        verdict = self._at_cap(session, args, name, pool, now)
        if verdict[2] == "rejected:cap":
            self._count_cap(pool.window)
        return verdict

    def _at_cap(self, session: Session, args: list[bytes], name: str, pool: Pool, now: float) -> tuple[int, Any, str]:
        if name == "quit":  # leaving is always allowed, and costs nothing
            session.close_after_reply = True
            return Admission.REPLY, b"+OK\r\n", "local"
        if self.handshake is not None and not session.multi_view:
            # a client connecting at the cap can still connect: its handshake is answered here
            local = self.handshake.answer(session, args, name)
            if local is not None:
                return Admission.REPLY, local, "local"
        if self.caps.on_cap == "idle" and not session.multi_view:
            # Idle means: keep well-behaved workers quiet and alive. Health checks and event
            # broadcasts get the answers they would get from a server with nobody listening, from
            # the proxy itself (nothing is sent upstream, nothing is billed).
            if name == "ping":
                if session.protocol == 2 and session.subs.any():
                    arg = args[1] if len(args) > 1 else b""
                    return Admission.REPLY, b"*2\r\n$4\r\npong\r\n$%d\r\n%s\r\n" % (len(arg), arg), "local"
                if len(args) > 1:
                    return Admission.REPLY, b"$%d\r\n%s\r\n" % (len(args[1]), args[1]), "local"
                return Admission.REPLY, b"+PONG\r\n", "local"
            if name in ("publish", "spublish") and len(args) == 3:
                return Admission.REPLY, b":0\r\n", "local"
        if self.caps.on_cap == "idle" and name in BLOCKING and not session.multi_view:
            timeout = block_timeout(name, args)
            if timeout is not None:
                if session.idle_until is None:
                    reset = self.bounds[pool.window][1]
                    wait = (reset - now) if timeout == 0 else min(timeout, reset - now)
                    session.idle_until = now + wait
                    if self.call_later is not None:
                        self.call_later(max(0.0, wait), session.resume)
                    return Admission.WAIT, None, ""
                if now < session.idle_until:
                    if self.call_later is not None:  # the timer fired a little early: again
                        self.call_later(session.idle_until - now + 0.001, session.resume)
                    return Admission.WAIT, None, ""
                session.idle_until = None
                empty = b"_\r\n" if session.protocol == 3 else BLOCKING[name][1]
                return Admission.REPLY, empty, "rejected:cap"
        if self.caps.on_cap == "idle" and not session.multi_view and not session.up_n and not session.got_reply:
            # A client that connected at the cap (nothing of it has gone upstream, its handshake
            # was answered here): a worker starting up would exit at its first real command, so
            # that command waits, quietly, for the window to reset, and goes then. (One that
            # crosses the cap in its first pipeline gets the error: its replies are on the way.)
            if session.idle_until is None or now >= session.idle_until:
                session.idle_until = self.bounds[pool.window][1]
            if self.call_later is not None:
                self.call_later(max(0.0, session.idle_until - now) + 0.001, session.resume)
            return Admission.WAIT, None, ""
        return Admission.REPLY, self.cap_error(pool), "rejected:cap"

    def _rate(self, session: Session, client: str, name: str, now: float) -> tuple[int, Any, str] | None:
        key = (client, name)
        rules = self._rules_for.get(key)
        if rules is None:
            rules = self._rules_for[key] = [r for r in self.rules if r.matches(client, name)]
        for rule in rules:
            b = self.buckets.get((rule.name, client))
            if b is None:
                b = self.buckets[(rule.name, client)] = Bucket(rule.burst, now)
            b.tokens = min(rule.burst, b.tokens + (now - b.at) * rule.rate)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                session.throttle_noted = False
                continue
            if rule.action == "reject":
                self._throttled(rule, "reject")
                return Admission.REPLY, encode_error(f"ERR respmeter: rate limit {rule.name} exceeded"), "rejected:rate_limit"
            wait = (1.0 - b.tokens) / rule.rate
            if not session.throttle_noted:  # once per command, however often it is looked at
                session.throttle_noted = True
                self._throttled(rule, "delay")
            session.hold_limit = rule.max_queue
            session.hold_reject = encode_error(f"ERR respmeter: rate limit {rule.name} exceeded (queue full)")
            if self.call_later is not None:
                self.call_later(wait, session.resume)
            return Admission.WAIT, None, ""
        return None

    def _throttled(self, rule: RateRule, action: str) -> None:
        k = (rule.name, action)
        self.throttled[k] = self.throttled.get(k, 0) + 1

    # -- persistence and reporting ----------------------------------------------------------------------
    def flush(self, release: bool = False) -> None:
        """Write what this process spent, count deltas and heartbeats (every second, and on exit)."""
        if self.store is None:
            return
        spent = [(p.win_id, p.scope, p.spent) for p in self._pools.values()]
        rel = [(p.win_id, p.scope, p.tokens) for p in self._pools.values() if release and p.tokens]
        counts = []
        if self.stats is not None:
            for key, n in list(self.stats.upstream.items()):
                delta = n - self._counted.get(key, 0)
                if delta:
                    self._counted[key] = n
                    for w in WINDOWS:
                        counts.append((self.win_ids[w], key[0], key[1], delta))
        patterns = []
        tracker = getattr(self.stats, "patterns", None) if self.stats is not None else None
        if tracker is not None:
            for (client, cmd, pat), (n, first, last) in tracker.take_deltas().items():
                for w in WINDOWS:
                    patterns.append((self.win_ids[w], client, cmd, pat, n, first, last))
        saved = []
        sw = saved_window(self.stats)
        if sw is not None:
            for (client, cmd, saver), (n, first, last) in sw.take_deltas().items():
                for w in WINDOWS:
                    saved.append((self.win_ids[w], client, cmd, saver, n, first, last))
        self.store.flush(spent, counts, patterns, rel, saved)
        if release:
            for p in self._pools.values():
                p.reserved -= p.tokens
                p.tokens = 0

    def close(self) -> None:
        if self.store is not None:
            self.flush(release=True)
            self.store.close_leases()

    def counted_total(self, window: str) -> int:
        """All upstream commands of the window: flushed counts plus what is not flushed yet."""
        total = sum(self.store.counts(self.win_ids[window]).values()) if self.store is not None else 0
        if self.stats is not None:
            total += sum(n - self._counted.get(k, 0) for k, n in self.stats.upstream.items())
        return total

    def used(self, window: str, scope: str = "") -> int:
        win = self.win_ids[window]
        own = self._pools.get(f"{window}|{scope}")
        if self.store is None:
            return own.spent if own else 0
        return self.store.used(win, scope, own.spent if own is not None else None)

    def snapshot_readonly(self) -> dict[str, Any]:
        """The snapshot of a stopped proxy's state directory (writes nothing)."""
        return self.snapshot(flush=False)

    def snapshot(self, flush: bool = True) -> dict[str, Any]:
        """Today's and this month's usage, per client and per command, caps, remaining and projection."""
        now = self.clock()
        if flush:
            if now >= self.next_reset:
                self._rollover(now)
            self.flush()
        else:
            b = self.window_bounds(now)
            self.win_ids = {w: b[w][0] for w in WINDOWS}
            self.bounds = {w: (b[w][1], b[w][2]) for w in WINDOWS}
        out: dict[str, Any] = {
            "generated_at": dt.datetime.fromtimestamp(now, self.tz).isoformat(),
            "timezone": self.caps.timezone,
            "on_cap": self.caps.on_cap,
            "windows": {},
        }
        for window in WINDOWS:
            start, end = self.bounds[window]
            win = self.win_ids[window]
            counts = self.store.counts(win) if self.store is not None else {}
            by_client: dict[str, int] = {}
            by_command: dict[str, int] = {}
            for (client, cmd), n in counts.items():
                by_client[client] = by_client.get(client, 0) + n
                by_command[cmd] = by_command.get(cmd, 0) + n
            cap = getattr(self.caps, window)
            used = self.used(window) if cap else sum(by_client.values())
            elapsed = max(1.0, now - start)
            span = end - start
            clients = {}
            for client in sorted(set(by_client) | set(self.caps.clients)):
                ccap = self.caps.clients.get(client, {}).get(window)
                cused = self.used(window, client) if ccap else by_client.get(client, 0)
                clients[client] = {
                    "used": cused,
                    "cap": ccap,
                    "remaining": None if not ccap else max(0, ccap - cused),
                    "projected": round(cused * span / elapsed),
                }
            out["windows"][window] = {
                "id": win.split(":", 1)[1],
                "start": dt.datetime.fromtimestamp(start, self.tz).isoformat(),
                "resets_at": dt.datetime.fromtimestamp(end, self.tz).isoformat(),
                "elapsed_seconds": round(now - start, 1),
                "cap": cap,
                "used": used,
                "remaining": None if not cap else max(0, cap - used),
                "projected": round(used * span / elapsed),
                "projected_exceeds_cap": bool(cap) and used * span / elapsed > cap,
                "clients": clients,
                "commands": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
            }
        return out


__all__ = ["Limits", "CapConfig", "RateRule", "parse_rate", "LimitsConfigError", "encode_command"]
