"""Key patterns: where the traffic goes, bounded.

A key pattern is the first key of a command with its variable parts folded: UUIDs, e-mail addresses,
tokens, long hex runs and digit runs become ``*`` (``celery-task-meta-<uuid>`` -> ``celery-task-meta-*``,
``ratelimit:spotify:user123`` -> ``ratelimit:spotify:user*``, ``user:bob@example.com:cart`` ->
``user:*@*.com:cart``, ``session:alice:resetpw:<token>`` -> ``session:alice:resetpw:*``). Patterns are
shown on the admin endpoint and in reports, so what looks like a secret or a person never appears
there verbatim (see :func:`fold`). Multi-key blocking pops (BRPOP on a
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
