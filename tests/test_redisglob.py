"""proxy.redisglob agrees with a real redis-server on glob patterns.

The oracle is the server's own matching: one connection PSUBSCRIBEs every pattern, another PUBLISHes
each subject, and the ``pmessage`` replies name exactly the patterns that matched it.  The fuzz also
cross-checks KEYS (one key per non-empty subject), which uses the same matcher.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from proxy import redisglob
from proxy.redisglob import compile_glob, match

# (pattern, subject, what Redis answers) -- each row is also checked against the server.
CORNERS: list[tuple[bytes, bytes, bool]] = [
    # empty pattern / empty subject: only "" matches "", PSUBSCRIBE * does not get channel ""
    (b"", b"", True), (b"", b"a", False), (b"*", b"", False), (b"**", b"", False), (b"?", b"", False),
    (b"*", b"anything", True), (b"?", b"a", True), (b"?", b"ab", False),
    # the documented examples, case-sensitivity
    (b"h?llo", b"hello", True), (b"h*llo", b"hllo", True), (b"h*llo", b"heeeello", True),
    (b"h[ae]llo", b"hallo", True), (b"h[ae]llo", b"hillo", False),
    (b"h[^e]llo", b"hallo", True), (b"h[^e]llo", b"hello", False), (b"h[a-b]llo", b"hbllo", True),
    (b"HELLO", b"hello", False), (b"[a-z]", b"A", False),
    # ranges: reversed, degenerate, '-' as an end, signed bytes
    (b"[z-a]", b"m", True), (b"[z-a]", b"A", False), (b"[a-a]", b"a", True), (b"[--0]", b".", True),
    (b"[-a]", b"-", True), (b"[^a-c]", b"d", True), (b"[^a-c]", b"b", False),
    (b"[a-\xff]", b"\x00", True), (b"[a-\xff]", b"\x80", False), (b"[a-\xff]", b"b", False),
    (b"[\x00-\xff]", b"a", False), (b"[\x00-\xff]", b"\xff", True), (b"[\x00-\xff]", b"\x00", True),
    (b"[\x81-\xfe]", b"\x90", True), (b"[\xfe-\x81]", b"\x90", True), (b"[\x7f-\x80]", b"a", True),
    # escapes, outside and inside sets; a trailing backslash is a literal one
    (b"\\*", b"*", True), (b"\\*", b"a", False), (b"\\?", b"?", True), (b"\\?", b"a", False),
    (b"\\[a]", b"[a]", True), (b"\\a", b"a", True), (b"a\\", b"a\\", True), (b"\\", b"\\", True),
    (b"\\\\", b"\\", True), (b"[\\]]", b"]", True), (b"[\\]", b"]", True), (b"[\\]", b"\\", False),
    (b"[a\\-z]", b"-", True), (b"[a\\-z]", b"m", False),
    (b"[\\a-z]", b"-", True), (b"[\\a-z]", b"m", False),  # \a, then '-' and 'z' (no range)
    (b"[a\\", b"\\", True), (b"[a-\\]", b"_", True), (b"[a-\\]", b"]", True),  # '\\' ends a range
    (b"[a-\\]]", b"^]", True), (b"[a-\\]]", b"^", False),  # ... so ']' closes, then a literal ']'
    # ']' right after '[' closes an empty set; a range may end in ']' and run on to the end
    (b"[]]", b"]", False), (b"[]a]", b"xa]", False), (b"[^]]", b"x]", True), (b"[^]", b"x", True),
    (b"[a-]", b"_", True), (b"[a-]", b"]", True), (b"[a-]", b"-", False), (b"[a-]x", b"x", True),
    (b"[a-]x", b"x]", False),
    # unterminated sets take the rest of the pattern
    (b"[", b"[", False), (b"[", b"", False), (b"[^", b"x", True), (b"[abc", b"b", True),
    (b"[abc", b"[", False), (b"a[", b"a[", False), (b"[a-c", b"b", True), (b"[a*", b"*", True),
    (b"[a*", b"ab", False), (b"*[", b"a", False),
    # '^' only negates first; '*' and '?' are literal in sets
    (b"[a^]", b"^", True), (b"[*]", b"*", True), (b"[*]", b"a", False), (b"[?]", b"a", False),
    # stars
    (b"a*b*c", b"abc", True), (b"a*b*c", b"aXbYc", True), (b"a*b*c", b"acb", False),
    (b"*a", b"a", True), (b"*a", b"ba", True), (b"a*", b"a", True), (b"a**", b"a", True),
    (b"a*?", b"a", False), (b"*?*", b"x", True), (b"a\\**", b"a*bc", True), (b"a\\**", b"ab", False),
    # bytes, not characters; regex metacharacters are plain
    (b"?", b"\xe9", True), (b"?", "\u00e9".encode(), False), (b"a?c", b"a\nc", True),
    (b"a*", b"a\n\nb", True), (b"a\x00*", b"a\x00b", True), (b"[\x00]", b"\x00", True),
    (b"a.c", b"abc", False), (b"a.c", b"a.c", True), (b"(a|b)", b"a", False), (b"(a|b)", b"(a|b)", True),
    (b"a+", b"aa", False), (b"$^", b"$^", True), (b"x{1}", b"x{1}", True), (b"\\d", b"d", True),
    # Redis's recursion guard: more than 1000 '*' runs not at the very end never match
    (b"*a" * 1000, b"a" * 1000, True), (b"*a" * 1001, b"a" * 1001, False),
    (b"a*" * 1001, b"a" * 1001, True), (b"*a" * 1000 + b"*", b"a" * 1001, True),
    (b"*a" * 1001 + b"*", b"a" * 1001, False), (b"*\\*" * 1001, b"*" * 1001, False),
    (b"a[*]" * 1001, b"a*" * 1001, True),
    # Celery's event channels
    (b"/0.celeryev/worker.*", b"/0.celeryev/worker.heartbeat", True),
    (b"/0.celeryev/worker.*", b"/0.celeryev/task.succeeded", False),
    (b"/0.celeryev/worker.*", b"/0Xceleryev/worker.heartbeat", False),
]


def server_matches(server, patterns: Iterable[bytes], subjects: Iterable[bytes]) -> dict[bytes, set[bytes]]:
    """subject -> the patterns redis-server delivers a PUBLISH on that channel to."""
    patterns = sorted(set(patterns))
    sub = server.client().pubsub()
    pub = server.client()
    try:
        if patterns:
            sub.psubscribe(*patterns)
            confirmed = 0
            while confirmed < len(patterns):  # every subscription is live before the first PUBLISH
                msg = sub.get_message(timeout=10)
                assert msg is not None, "PSUBSCRIBE confirmations stopped coming"
                if msg["type"] == "psubscribe":
                    confirmed = msg["data"]
        result: dict[bytes, set[bytes]] = {}
        for subject in dict.fromkeys(subjects):
            expected = pub.publish(subject, b"x")
            got: set[bytes] = set()
            while len(got) < expected:
                msg = sub.get_message(timeout=10)
                assert msg is not None, f"pmessages for {subject!r} stopped coming"
                if msg["type"] == "pmessage" and msg["channel"] == subject:
                    got.add(msg["pattern"])
            result[subject] = got
        return result
    finally:
        sub.close()


def disagreements(
    oracle: dict[bytes, set[bytes]], patterns: Iterable[bytes]
) -> list[tuple[bytes, bytes, bool]]:
    """(pattern, subject, server's answer) wherever redisglob answers otherwise."""
    compiled = [(p, compile_glob(p)) for p in set(patterns)]
    return [
        (p, s, p in matched)
        for s, matched in oracle.items()
        for p, pred in compiled
        if pred(s) != (p in matched)
    ]


def test_corner_table_matches_redis(redis_factory) -> None:
    server = redis_factory()
    patterns = [p for p, _, _ in CORNERS]
    subjects = [s for _, s, _ in CORNERS]
    oracle = server_matches(server, patterns, subjects)
    # the table's expectations are what the server says ...
    wrong_table = [(p[:40], s[:40], want) for p, s, want in CORNERS if (p in oracle[s]) != want]
    assert not wrong_table, f"table rows the server disagrees with: {wrong_table}"
    # ... and the module agrees on every row and on the whole table's cross product
    assert [(p[:40], s[:40]) for p, s, want in CORNERS if match(p, s) is not want] == []
    bad = [(p[:40], s[:40], server_says) for p, s, server_says in disagreements(oracle, patterns)]
    assert not bad, f"{len(bad)} disagreements with redis-server, e.g. {bad[:10]}"


def test_celery_worker_pattern(redis_factory) -> None:
    pattern, channel = b"/0.celeryev/worker.*", b"/0.celeryev/worker.heartbeat"
    assert match(pattern, channel) is True
    assert compile_glob(pattern)(b"/0.celeryev/worker.online") is True
    assert match(pattern, b"/0.celeryev/worker.") is True
    assert match(pattern, b"/0.celeryev/worker") is False
    assert server_matches(redis_factory(), [pattern], [channel]) == {channel: {pattern}}


FUZZ_SEED = 20240607
PATTERN_BYTES = b"ab*?[]^-\\xyz" * 4 + b"\x00\x7f\x80\xff"
SUBJECT_BYTES = b"abxyz" * 3 + b"*?[]^-\\\x00\x7f\x80\xff"


def _fuzz_cases() -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(FUZZ_SEED)

    def word(alphabet: bytes, longest: int) -> bytes:
        return bytes(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))

    patterns = list(dict.fromkeys(word(PATTERN_BYTES, 10) for _ in range(5000)))
    subjects = list(dict.fromkeys([b""] + [word(SUBJECT_BYTES, 7) for _ in range(200)]))
    return patterns, subjects


def test_fuzz_matches_redis(redis_factory) -> None:
    server = redis_factory()
    patterns, subjects = _fuzz_cases()
    oracle = server_matches(server, patterns, subjects)
    positives = sum(len(v) for v in oracle.values())
    assert positives > 1000, f"the fuzz should exercise matches too, got {positives}"
    bad = disagreements(oracle, patterns)
    assert not bad, f"{len(bad)} disagreements with redis-server, e.g. {bad[:10]}"

    # KEYS uses the same matcher (pattern "*" aside, which is moot without an empty key)
    r = server.client()
    r.flushdb()
    r.mset({s: b"1" for s in subjects if s})
    pipe = r.pipeline(transaction=False)
    for p in patterns:
        pipe.keys(p)
    for p, found in zip(patterns, pipe.execute(), strict=True):
        assert set(found) == {s for s in oracle if s and p in oracle[s]}, p


# Patterns that make a naive backtracking matcher exponential; Redis answers them at once.
HOSTILE: list[tuple[bytes, bytes]] = [
    (b"*a" * 40 + b"b", b"a" * 3000),
    (b"*a*a*a*a*a*a*a*a*a*a*a*c", b"a" * 3000 + b"c"),
    (b"*a" * 200 + b"b", b"a" * 20000),
    (b"*?" * 300 + b"*b", b"a" * 20000),
    (b"*a*" * 500, b"a" * 20000),
    (b"*[ab]" * 100 + b"c", b"ab" * 5000),
]


def test_hostile_patterns_stay_fast(redis_factory) -> None:
    oracle = server_matches(redis_factory(), [p for p, _ in HOSTILE], [s for _, s in HOSTILE])
    # a regression would hang inside re, so the module runs in a child that a timeout can end
    child = (
        "import ast, sys, time\n"
        "from proxy.redisglob import match\n"
        "cases = ast.literal_eval(sys.stdin.read())\n"
        "started = time.perf_counter()\n"
        "print([match(p, s) for p, s in cases], time.perf_counter() - started)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", child], input=repr(HOSTILE), capture_output=True, text=True, timeout=20,
            cwd=Path(__file__).resolve().parent.parent, check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("redisglob backtracks on hostile patterns (no answer in 20 s)")
    answers, elapsed = done.stdout.rsplit(" ", 1)
    assert answers == repr([p in oracle[s] for p, s in HOSTILE])
    assert float(elapsed) < 2.0, f"hostile patterns took {float(elapsed):.2f} s"


def test_api_shape() -> None:
    pred = compile_glob(bytearray(b"news.*"))
    assert pred(b"news.art") is True and pred(b"sport") is False
    assert compile_glob(b"plain")(b"plain") is True and compile_glob(b"plain")(b"plainer") is False
    assert match(memoryview(b"h[ae]llo"), b"hello") is True
    assert redisglob._cached_compile.cache_info().maxsize is not None  # the cache is bounded


@pytest.mark.parametrize("pattern", [b"", b"*", b"\\", b"[", b"[^", b"[a-", b"a[\\"])
def test_degenerate_patterns_compile(pattern: bytes) -> None:
    compile_glob(pattern)(b"x")
