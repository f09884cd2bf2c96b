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

OTHER = "other"
NOKEY = "-"  # commands without a key (PING, PUBLISH's channel is not a key, ...)

_UUID = re.compile(rb"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(rb"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{8,}(?![0-9A-Za-z])")
_DIGITS = re.compile(rb"[0-9]+")
_STARS = re.compile(rb"\*+")
MAX_KEY = 200
MULTI_KEY = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax", "blmpop", "bzmpop"})  # + " timeout=N"
# Channels count as the "key" of pub/sub commands: where the traffic goes
CHANNEL_FIRST = frozenset({"publish", "spublish"})


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
    __slots__ = ("limit", "counts", "_cache", "_known", "_minutes", "_minute", "_cur", "_flushed", "clock", "_started")

    def __init__(self, limit: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.clock = clock
        self._started = clock()
        self.counts: dict[tuple[str, str, str], int] = {}  # since start
        self._cache: dict[bytes, str] = {}
        self._known: set[str] = set()
        # per-minute deltas for windowed rates: deque of (minute, {key: n}), last 24 h
        self._minutes: deque[tuple[int, dict[tuple[str, str, str], int]]] = deque(maxlen=24 * 60)
        self._minute = -1
        self._cur: dict[tuple[str, str, str], int] = {}
        self._flushed: dict[tuple[str, str, str], tuple[int, float]] = {}  # key -> (n flushed, first seen)

    def pattern(self, name: str, info: Any, args: list[bytes]) -> str:
        if info is None:
            # not in the command table: its name (and a container's subcommand) is what to show,
            # never its arguments, which may be data or secrets
            if not args:
                return NOKEY
            parent = cmdtable.lookup(args[:1])
            shown = args[:2] if parent is not None and parent.subcommands and len(args) > 1 else args[:1]
            pat = self._fold(b" ".join(a[:32] for a in shown)).upper()
        elif len(args) < 2:
            return NOKEY
        elif name in MULTI_KEY:
            idx = cmdtable.key_indices(info, args)
            pats = sorted({self._fold(args[i]) for i in idx})
            pat = " ".join(pats[:4]) + (" …" if len(pats) > 4 else "")
            timeout = args[1] if name in ("blmpop", "bzmpop") else args[-1]
            pat += " timeout=" + timeout[:12].decode("ascii", "replace")
        elif name == "ping":
            pat = self._fold(args[1])
        elif name in CHANNEL_FIRST:
            pat = self._fold(args[1])
        elif info.first_key == 1:
            pat = self._fold(args[1])
        else:
            idx = cmdtable.key_indices(info, args)
            if not idx:
                return NOKEY
            pat = self._fold(args[idx[0]])
        if pat not in self._known:
            if len(self._known) >= self.limit:
                return OTHER
            self._known.add(pat)
        return pat

    def _fold(self, key: bytes) -> str:
        p = self._cache.get(key)
        if p is None:
            if len(self._cache) > 50_000:
                self._cache.clear()
            p = self._cache[key] = fold(key)
        return p

    def add(self, client: str, name: str, pattern: str, n: int = 1) -> None:
        key = (client, name, pattern)
        c = self.counts
        c[key] = c.get(key, 0) + n
        minute = int(self.clock() // 60)
        if minute != self._minute:
            self._roll(minute)
        cur = self._cur
        cur[key] = cur.get(key, 0) + n

    def _roll(self, minute: int) -> None:
        if self._cur:
            self._minutes.append((self._minute, self._cur))
        self._cur = {}
        self._minute = minute

    def window(self, seconds: float) -> tuple[dict[tuple[str, str, str], int], float]:
        """Counts over the last ``seconds`` (whole minutes plus the current one) and the span covered."""
        now = self.clock()
        minute = int(now // 60)
        if minute != self._minute:
            self._roll(minute)
        since = minute - int(seconds // 60)
        out: dict[tuple[str, str, str], int] = {}
        oldest = minute
        for m, d in self._minutes:
            if m >= since:
                oldest = min(oldest, m)
                for k, n in d.items():
                    out[k] = out.get(k, 0) + n
        for k, n in self._cur.items():
            out[k] = out.get(k, 0) + n
        span = max(1.0, now - max(oldest * 60, now - seconds, self.started()))
        return out, span

    def started(self) -> float:
        return self._started

    def take_deltas(self) -> dict[tuple[str, str, str], tuple[int, float, float]]:
        """Counts added since the last call, with first/last seen times, for the store."""
        now = self.clock()
        out = {}
        for key, n in self.counts.items():
            done, first = self._flushed.get(key, (0, now))
            if n != done:
                out[key] = (n - done, first, now)
                self._flushed[key] = (n, first)
        return out
