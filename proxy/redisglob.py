"""Redis glob patterns (PSUBSCRIBE, KEYS, SCAN MATCH), matched on bytes exactly as redis-server does.

:func:`compile_glob` turns a pattern into a predicate; :func:`match` is the same with a bounded cache.
The rules, as observed on a real server (tests/test_redisglob.py checks them against one):

* ``*`` matches any run of bytes, ``?`` any one byte, ``\\x`` the byte ``x``; a trailing ``\\`` is a
  literal backslash.  Matching is case-sensitive and byte-wise (``\\n`` and NUL are ordinary bytes).
* ``[...]`` matches one byte from a set; ``[^...]`` one byte outside it (``^`` counts only first).
  Inside, ``\\x`` is the literal ``x`` (``[\\]]`` is ``]``); ``a-z`` is a range in either order
  (``[z-a]`` == ``[a-z]``) whose end may be ``]`` or ``\\`` (``[a-]`` is an *unterminated* set
  holding the range ``]``..``a``); bytes compare as *signed* chars, as on x86-64 builds, so
  ``[a-\\xff]`` is ``\\xff`` plus ``\\x00``..``a``.  ``]`` right after ``[`` closes an empty set
  (``[]]`` matches nothing).  An unterminated set takes the rest of the pattern and matches one byte.
* Nothing but the empty pattern matches an empty subject (PSUBSCRIBE ``*`` does not match channel
  ``""``; only KEYS special-cases the pattern ``*``).
* A pattern with more than 1000 ``*`` runs that are not at its very end never matches (Redis's
  recursion guard).

Translation is to a ``re`` fullmatch with every star but the last an atomic lazy group: committing
to the leftmost occurrence of each fixed-width segment is what Redis's own early exit does, and
keeps hostile patterns (``*a*a*a*...b``) near-linear instead of exponential.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

__all__ = ["compile_glob", "match"]

_MAX_STAR_NESTING = 1000  # Redis gives up (no match) past this many nested '*' expansions
_STAR, _QUESTION, _BACKSLASH, _OPEN, _CLOSE, _CARET, _DASH = b"*?\\[]^-"


def _signed(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def _parse_set(pattern: bytes, i: int) -> tuple[set[int], int]:
    """The bytes matched by the set whose ``[`` is at ``pattern[i - 1]``, and the index after it."""
    n = len(pattern)
    negate = i < n and pattern[i] == _CARET
    i += negate
    members: set[int] = set()
    while i < n:
        c = pattern[i]
        if c == _BACKSLASH and i + 1 < n:
            members.add(pattern[i + 1])
            i += 2
        elif c == _CLOSE:
            i += 1
            break
        elif i + 2 < n and pattern[i + 1] == _DASH:
            lo, hi = sorted((_signed(c), _signed(pattern[i + 2])))
            members.update(b for b in range(256) if lo <= _signed(b) <= hi)
            i += 3
        else:
            members.add(c)
            i += 1
    return (set(range(256)) - members if negate else members), i


def _class(members: set[int]) -> bytes:
    if not members:
        return rb"(?!)"
    if len(members) == 256:
        return b"."
    runs: list[list[int]] = []
    for b in sorted(members):
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    body = b"".join(b"\\x%02x" % lo if lo == hi else b"\\x%02x-\\x%02x" % (lo, hi) for lo, hi in runs)
    return b"[" + body + b"]"


def _segments(pattern: bytes) -> list[list[bytes]]:
    """Regex pieces (one per subject byte) of the fixed-width runs between ``*`` runs."""
    segments: list[list[bytes]] = [[]]
    i, n, after_star = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        i += 1
        if c == _STAR:
            if not after_star:  # a run of stars is one star
                segments.append([])
            after_star = True
            continue
        after_star = False
        if c == _QUESTION:
            piece = b"."
        elif c == _OPEN:
            members, i = _parse_set(pattern, i)
            piece = _class(members)
        else:
            if c == _BACKSLASH and i < n:
                c = pattern[i]
                i += 1
            piece = re.escape(bytes([c]))
        segments[-1].append(piece)
    return segments


def _never(subject: bytes) -> bool:
    return False


def _nonempty(subject: bytes) -> bool:
    return len(subject) > 0


def compile_glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A predicate ``subject -> bool`` telling whether Redis would match ``subject`` to ``pattern``."""
    pattern = bytes(pattern)
    if not any(c in pattern for c in b"*?[\\"):
        return lambda subject: subject == pattern
    segments = [b"".join(seg) for seg in _segments(pattern)]
    stars = len(segments) - 1
    if stars - (segments[-1] == b"") > _MAX_STAR_NESTING:
        return _never
    if not any(segments):  # only stars: anything but the empty subject
        return _nonempty
    if stars == 0:
        regex = segments[0]
    else:
        middle = b"".join(b"(?>.*?" + seg + b")" for seg in segments[1:-1])
        regex = segments[0] + middle + b".*" + segments[-1]
    fullmatch = re.compile(regex, re.DOTALL).fullmatch
    return lambda subject: fullmatch(subject) is not None


_cached_compile = lru_cache(maxsize=4096)(compile_glob)


def match(pattern: bytes, subject: bytes) -> bool:
    """``compile_glob(pattern)(subject)``, with the last 4096 compiled patterns cached."""
    return _cached_compile(bytes(pattern))(subject)
