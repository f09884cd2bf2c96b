"""Key patterns: where the traffic goes, bounded.

A key pattern is the first key of a command with its variable parts folded: UUIDs, e-mail addresses,
tokens, long hex runs and digit runs become ``*`` (``celery-task-meta-<uuid>`` -> ``celery-task-meta-*``,
``ratelimit:spotify:user123`` -> ``ratelimit:spotify:user*``, ``user:bob@example.com:cart`` ->
``user:*@*.com:cart``, ``session:alice:resetpw:<token>`` -> ``session:alice:resetpw:*``). Patterns are
shown on the admin endpoint and in reports, so what looks like a secret or a person never appears
there verbatim (see :func:`fold`). Multi-key blocking pops (BRPOP on a
queue and its priority variants) list their folded keys. Counts are kept per (client, command,
pattern) with a hard cap on distinct patterns (the rest count as ``other``), in per-second buckets
(per minute beyond an hour) for windowed rates, and are flushed with the usage state. They are never
Prometheus labels.
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
# local@domain.tld: the local part and the domain but its last label go (``*@*.com``; Celery's
# ``celery@HOST.celery.pidbox`` keeps its ``pidbox``)
_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+([A-Za-z]{2,24})(?![A-Za-z0-9-])")
# a run of token characters (base64 and base64url alphabets), at least TOKEN_MIN long
TOKEN_MIN = 16
_RUN = re.compile(rb"[A-Za-z0-9_+/=-]{%d,}" % TOKEN_MIN)
_PIECE_SEP = re.compile(rb"([-_+/=]+)")
# a piece that reads as words: lowercase or Capitalised words of 2+ letters, at most one ALLCAPS word
# (2-8 letters), digits between and after them; or a number; or one letter with digits (v2, x, Q1)
_WORDS = re.compile(rb"[0-9]*(?:(?:[A-Z]?[a-z]{2,}|[A-Z]{2,8}(?![a-z]))[0-9]*)+")
_SHORT = re.compile(rb"[0-9]+|[A-Za-z][0-9]*")
_CAPS = re.compile(rb"[A-Z]{2,}(?![a-z])")
_INNER_DIGITS = re.compile(rb"[0-9]+(?=[A-Za-z])")
_LETTER_RUNS = re.compile(rb"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
_PREFIX_WORD = re.compile(rb"[a-z]{3,}")
_HEX = re.compile(rb"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{8,}(?![0-9A-Za-z])")
_DIGITS = re.compile(rb"[0-9]+")
_STARS = re.compile(rb"\*+")
MAX_KEY = 200  # a key is cut to this many bytes before it is folded or kept anywhere
FAST_LIMIT = 50_000  # raw keys cached by PatternTracker.fast (each at most MAX_KEY bytes)
MULTI_KEY = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax", "blmpop", "bzmpop"})  # + " timeout=N"
# Channels count as the "key" of pub/sub commands: where the traffic goes
CHANNEL_FIRST = frozenset({"publish", "spublish"})
# Commands whose pattern is just their folded first argument (the hot path's cache applies)
FAST_NAMES = frozenset(
    name
    for name, info in cmdtable.all_commands().items()
    if info.first_key == 1 and name not in MULTI_KEY and name not in CHANNEL_FIRST and name != "ping"
)


def reads_as_words(piece: bytes) -> bool:
    """Whether one piece of a token run (between ``-``, ``_``, ``+``, ``/``, ``=``) reads as words
    rather than as random characters: ``unacked``, ``celery``, ``getUserProfile``, ``user123profile``,
    ``HTTPRequest2``, ``v2`` do; ``ZqTokenAbc9XyZ4Kp``, ``x2kqz7m4p9``, ``JBSWY3DPEHPK3PXP`` do not."""
    if _SHORT.fullmatch(piece):
        return True
    if not _WORDS.fullmatch(piece) or len(_CAPS.findall(piece)) > 1:
        return False
    inner = _INNER_DIGITS.findall(piece.lstrip(b"0123456789"))
    if inner:  # digits between words: at most two groups, between words of 3+ letters
        if len(inner) > 2 or any(len(w) < 3 for w in _LETTER_RUNS.findall(piece)):
            return False
    return True


def _fold_run(m: re.Match) -> bytes:
    """A run of TOKEN_MIN+ token characters: kept if every piece reads as words, else folded, but for
    leading lowercase words of 3+ letters (``cache-user-<token>`` -> ``cache-user-*``). A random
    base64url token starts that way about once in 300: then its first 3+ letters stay."""
    run = m.group()
    parts = _PIECE_SEP.split(run)
    if all(reads_as_words(p) for p in parts[::2] if p):
        return run
    keep = 0
    while keep + 1 < len(parts) and _PREFIX_WORD.fullmatch(parts[keep]):
        keep += 2
    return b"".join(parts[:keep]) + b"*"


def fold(key: bytes) -> str:
    """The pattern of one key (printable, bounded).

    Folded to ``*``, in this order: UUIDs; e-mail addresses (to ``*@*.<last label>``); tokens, that
    is runs of 16 or more base64/base64url characters (letters, digits, ``-_+/=``) in which a piece
    does not read as words (:func:`reads_as_words`: random base64url tokens fold whole 99 times in
    100 at 16 characters, 996 in 1000 at 24 or more, while ``celery-task-meta-``,
    ``redis-py-health-check`` or ``getUserProfileCache`` stay); then hex runs of 8+ with a digit, and
    digit runs. A run of only lowercase letters is kept as it is. The result is cached per raw key
    (``PatternTracker.fast``) for commands whose first argument is their key.
    """
    k = key[:MAX_KEY]
    k = _UUID.sub(b"*", k)
    if b"@" in k:
        k = _EMAIL.sub(lambda m: b"*@*." + m.group(1), k)
    k = _RUN.sub(_fold_run, k)
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
    once-a-second :meth:`tick` closes ``cur`` as one bucket of the time since the previous tick and
    adds it to what the store has not seen yet. ``fast`` maps a raw first key to its final pattern for
    commands whose first argument is their key, so most commands cost one dict lookup here.

    Windowed counts (:meth:`window`) come from these buckets: one per tick (about a second) for the
    last ``FINE_SECONDS``, then merged into buckets of about a minute for the last ``KEEP_SECONDS``.
    Each bucket knows the span it covers, so a window is the buckets inside it, plus the one its start
    falls in when more than half of that one is inside, over the span those buckets cover: a bucket
    is never counted whole against a shorter span. Memory: at most ``FINE_ENTRIES`` counts in the
    per-tick buckets (beyond that the oldest are merged early) and one bucket a minute beyond.
    """

    __slots__ = (
        "limit", "cur", "fast", "_known", "_fine", "_fine_entries", "_coarse", "_last_tick", "_kept_from",
        "_unflushed", "clock", "_started",
    )

    FINE_SECONDS = 3600.0  # per-tick buckets for the last hour...
    FINE_ENTRIES = 100_000  # ...holding at most this many counts (a busy proxy merges sooner)
    COARSE_SECONDS = 60.0  # then buckets of at most a minute...
    KEEP_SECONDS = 86400.0 + 60.0  # ...for a day

    def __init__(self, limit: int = 1000, clock: Callable[[], float] = time.time, started: float | None = None) -> None:
        self.limit = limit
        self.clock = clock
        # ``started``: when counting began, if before now (proxy.savedcounts aligns with the key patterns)
        self._started = clock() if started is None else started
        self.cur: dict[tuple[str, str, str], int] = {}  # since the last tick
        self.fast: dict[bytes, str] = {}  # raw first key -> pattern (already bounded)
        self._known: set[str] = set()
        # buckets (start, end, {key: n}), oldest first, each covering (start, end]: per tick, then
        # per minute; end of one == start of the next, but for ticks with nothing counted (no bucket)
        self._fine: deque[tuple[float, float, dict[tuple[str, str, str], int]]] = deque()
        self._fine_entries = 0
        self._coarse: deque[tuple[float, float, dict[tuple[str, str, str], int]]] = deque()
        self._last_tick = self._started
        self._kept_from = self._started  # counts before this were dropped (older than KEEP_SECONDS)
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
        if name == "client|setinfo":
            # LIB-NAME shows what library sent the traffic (redis-py, 'redis-py(celery_v5.7.0)'); the
            # report takes a Celery one as evidence (proxy/sources.toml)
            if len(args) > 3 and args[2].lower() == b"lib-name":
                return self._bound(fold(args[3][:64]))
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
                if len(key) <= MAX_KEY:  # the cache holds short keys only: at most ~10 MB of them
                    if len(self.fast) > FAST_LIMIT:
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
        """Close what was counted since the last tick as one bucket, and queue it for the store."""
        now = self.clock()
        start = self._last_tick
        if now < start:  # the wall clock stepped back: never a bucket that ends before it starts
            now = start
        self._last_tick = now
        cur = self.cur
        if cur:
            self.cur = {}
            self._fine.append((start, now, cur))
            self._fine_entries += len(cur)
            unflushed = self._unflushed
            for k, n in cur.items():
                u = unflushed.get(k)
                if u is None:
                    unflushed[k] = [n, now, now]
                else:
                    u[0] += n
                    u[2] = now
        self._age(now)

    def _age(self, now: float) -> None:
        """Merge per-tick buckets older than FINE_SECONDS (or beyond FINE_ENTRIES) into buckets of
        at most COARSE_SECONDS, and drop those older than KEEP_SECONDS."""
        fine, coarse = self._fine, self._coarse
        while fine and (fine[0][1] <= now - self.FINE_SECONDS or self._fine_entries > self.FINE_ENTRIES):
            s, e, d = fine.popleft()
            self._fine_entries -= len(d)
            if coarse and e - coarse[-1][0] <= self.COARSE_SECONDS:
                cs, _, cd = coarse[-1]
                for k, n in d.items():
                    cd[k] = cd.get(k, 0) + n
                coarse[-1] = (cs, e, cd)
            else:
                coarse.append((s, e, d))
        while coarse and coarse[0][1] <= now - self.KEEP_SECONDS:
            self._kept_from = coarse.popleft()[1]

    def window(self, seconds: float) -> tuple[dict[tuple[str, str, str], int], float]:
        """Counts over the last ``seconds`` and the span they cover (at least 1 s).

        The span is ``seconds``, less what came before the tracker started (or was dropped), moved to
        the edge of the bucket the window's start falls in: to its start when more than half of it
        is inside the window (it is counted whole), to its end otherwise (it is left out)."""
        self.tick()
        now = self._last_tick
        since = now - seconds
        out: dict[tuple[str, str, str], int] = {}
        begin = since
        for buckets in (self._fine, self._coarse):
            for s, e, d in reversed(buckets):
                if e <= since:
                    break
                if s < since:  # the bucket the window starts in
                    if e - since < since - s:  # less than half inside: left out, the span starts at its end
                        begin = e
                        break
                    begin = s
                for k, n in d.items():
                    out[k] = out.get(k, 0) + n
            else:
                continue
            break
        begin = max(begin, self._kept_from)
        return out, max(1.0, now - begin)

    def started(self) -> float:
        return self._started

    def measured_until(self) -> float:
        """The end of the span :meth:`window` last measured (the time of the last tick)."""
        return self._last_tick

    def take_deltas(self) -> dict[tuple[str, str, str], tuple[int, float, float]]:
        """Counts added since the last call, with first/last seen times, for the store."""
        self.tick()
        out, self._unflushed = self._unflushed, {}
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}
