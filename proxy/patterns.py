"""Key patterns: where the traffic goes, bounded.

A key pattern is the first key of a command with its variable parts folded: UUIDs, long hex runs and
digit runs become ``*`` (``celery-task-meta-<uuid>`` -> ``celery-task-meta-*``,
``ratelimit:spotify:user123`` -> ``ratelimit:spotify:user*``). Multi-key blocking pops (BRPOP on a
queue and its priority variants) list their folded keys. Counts are kept per (client, command,
pattern) with a hard cap on distinct patterns (the rest count as ``other``), in per-minute buckets for
windowed rates, and are flushed with the usage state. They are never Prometheus labels.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import commands as cmdtable
from .resp import (
    NOKEY,  # commands without a key (PING, PUBLISH's channel is not a key, ...)
)

OTHER = "other"

_UUID = re.compile(rb"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(rb"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{8,}(?![0-9A-Za-z])")
_DIGITS = re.compile(rb"[0-9]+")
_STARS = re.compile(rb"\*+")
MAX_KEY = 200
MULTI_KEY = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax", "blmpop", "bzmpop"})  # + " timeout=N"
# Channels count as the "key" of pub/sub commands: where the traffic goes
CHANNEL_FIRST = frozenset({"publish", "spublish"})
# Commands whose pattern is just their folded first argument (the hot path's cache applies)
FAST_NAMES = frozenset(
    name
    for name, info in cmdtable.all_commands().items()
    if info.first_key == 1 and name not in MULTI_KEY and name not in CHANNEL_FIRST and name != "ping"
)


def fold(key: bytes) -> str:
    """The pattern of one key (printable, bounded)."""
    k = key[:MAX_KEY]
    k = _UUID.sub(b"*", k)
    k = _HEX.sub(b"*", k)
    k = _DIGITS.sub(b"*", k)
    k = _STARS.sub(b"*", k)
    text = k.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in text)
    if len(key) > MAX_KEY:
        text += "…"
    return text


class PatternTracker:
    """Counts per (client, command, pattern).

    The hot path adds to ``cur`` only (see :meth:`add`, or the session's inlined equivalent); the
    once-a-second :meth:`tick` moves ``cur`` into the current minute's bucket and into what the store
    has not seen yet. ``fast`` maps a raw first key to its final pattern for commands whose first
    argument is their key, so most commands cost one dict lookup here.
    """

    __slots__ = ("limit", "cur", "fast", "_known", "_minutes", "_minute", "_unflushed", "clock", "_started")

    def __init__(self, limit: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.clock = clock
        self._started = clock()
        self.cur: dict[tuple[str, str, str], int] = {}  # since the last tick
        self.fast: dict[bytes, str] = {}  # raw first key -> pattern (already bounded)
        self._known: set[str] = set()
        # per-minute counts for windowed rates: deque of (minute, {key: n}), the last 24 h
        self._minutes: deque[tuple[int, dict[tuple[str, str, str], int]]] = deque(maxlen=24 * 60)
        self._minute = int(self._started // 60)
        self._minutes.append((self._minute, {}))
        self._unflushed: dict[tuple[str, str, str], list] = {}  # key -> [n, first, last]

    def pattern(self, name: str, info: Any, args: list[bytes]) -> str:
        if info is None:
            # not in the command table: its name (and a container's subcommand) is what to show,
            # never its arguments, which may be data or secrets
            if not args:
                return NOKEY
            parent = cmdtable.lookup(args[:1])
            shown = args[:2] if parent is not None and parent.subcommands and len(args) > 1 else args[:1]
            return self._bound(fold(b" ".join(a[:32] for a in shown)).upper())
        if len(args) < 2:
            return NOKEY
        if name in MULTI_KEY:
            idx = cmdtable.key_indices(info, args)
            pats = sorted({fold(args[i]) for i in idx})
            pat = " ".join(pats[:4]) + (" …" if len(pats) > 4 else "")
            timeout = args[1] if name in ("blmpop", "bzmpop") else args[-1]
            return self._bound(pat + " timeout=" + timeout[:12].decode("ascii", "replace"))
        if name == "ping" or name in CHANNEL_FIRST:
            return self._bound(fold(args[1]))
        if info.first_key == 1:
            key = args[1]
            pat = self.fast.get(key)
            if pat is None:
                pat = self._bound(fold(key))
                if len(self.fast) > 50_000:
                    self.fast.clear()
                self.fast[key] = pat
            return pat
        idx = cmdtable.key_indices(info, args)
        if not idx:
            return NOKEY
        return self._bound(fold(args[idx[0]]))

    def _bound(self, pat: str) -> str:
        if pat not in self._known:
            if len(self._known) >= self.limit:
                return OTHER
            self._known.add(pat)
        return pat

    def add(self, client: str, name: str, pattern: str, n: int = 1) -> None:
        key = (client, name, pattern)
        cur = self.cur
        cur[key] = cur.get(key, 0) + n

    def tick(self) -> None:
        """Move what was counted since the last tick into its minute and the store's queue."""
        now = self.clock()
        cur, self.cur = self.cur, {}
        minute = int(now // 60)
        if minute != self._minute:
            self._minute = minute
            self._minutes.append((minute, {}))
        bucket = self._minutes[-1][1]
        unflushed = self._unflushed
        for k, n in cur.items():
            bucket[k] = bucket.get(k, 0) + n
            u = unflushed.get(k)
            if u is None:
                unflushed[k] = [n, now, now]
            else:
                u[0] += n
                u[2] = now

    def window(self, seconds: float) -> tuple[dict[tuple[str, str, str], int], float]:
        """Counts over the last ``seconds`` (whole minutes plus the current one) and the span covered."""
        self.tick()
        now = self.clock()
        since = int((now - seconds) // 60)
        out: dict[tuple[str, str, str], int] = {}
        oldest = None
        for m, d in self._minutes:
            if m >= since:
                oldest = m if oldest is None else min(oldest, m)
                for k, n in d.items():
                    out[k] = out.get(k, 0) + n
        start = max(now - seconds, self._started, (oldest * 60) if oldest is not None else now)
        return out, max(1.0, now - start)

    def started(self) -> float:
        return self._started

    def take_deltas(self) -> dict[tuple[str, str, str], tuple[int, float, float]]:
        """Counts added since the last call, with first/last seen times, for the store."""
        self.tick()
        out, self._unflushed = self._unflushed, {}
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}
