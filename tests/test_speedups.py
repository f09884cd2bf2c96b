"""The C hot path (proxy/_speedups.c) against the pure-Python reference, on generated input.

Each test feeds the same bytes, cut at the same random places, to both implementations and requires
the same result: the same frames, the same commands and bytes, the same errors at the same point, and,
for whole sessions, the same bytes on both sides and the same counts.

``RESPMETER_FUZZ_SCALE=N`` runs N times as many generated examples (a longer campaign, e.g. after
changing proxy/_speedups.c: ``RESPMETER_FUZZ_SCALE=50 pytest tests/test_speedups.py``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import commands as cmdtable
from proxy import resp
from proxy.metrics import Stats
from proxy.patterns import PatternTracker
from proxy.resp import NOKEY, ProtocolError, RequestParser, encode_command, expand
from proxy.paths import PLAIN
from proxy.session import Session

pytestmark = pytest.mark.skipif(resp._speedups is None, reason="proxy._speedups is not built")
SCALE = max(1, int(os.environ.get("RESPMETER_FUZZ_SCALE", "1") or 1))


def test_the_accelerator_is_built_here() -> None:
    """CI builds the C extension (gcc is there): a silent fallback to pure Python fails here."""
    if os.environ.get("RESPMETER_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("RESPMETER_PURE_PYTHON is set")
    assert resp.hot_path() == "C"


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def cuts_for(draw: st.DataObject, data: bytes) -> list[int]:
    how = draw.draw(st.sampled_from(["whole", "random", "bytewise"]))
    if how == "whole":
        return []
    if how == "bytewise" and len(data) <= 400:
        return list(range(1, len(data)))
    return draw.draw(st.lists(st.integers(0, len(data)), max_size=12))


def mutate(draw: st.DataObject, data: bytes) -> bytes:
    if not data or not draw.draw(st.booleans()):
        return data
    b = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3))):
        i = draw.draw(st.integers(0, len(b) - 1))
        b[i] = draw.draw(st.sampled_from(b"\r\n*$+-:0123456789 _x\x00>%|~!=#,(" + bytes([255])))
    return bytes(b)


# -- replies ---------------------------------------------------------------------------------------
HEADS = [b"message", b"MESSAGE", b"pmessage", b"smessage", b"subscribe", b"unsubscribe", b"Psubscribe",
         b"sunsubscribe", b"OK", b"messages", b"x" * 70]

scalar = st.one_of(
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b).map(lambda b: b"+" + b + b"\r\n"),
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b).map(lambda b: b"-ERR " + b + b"\r\n"),
    st.integers(-10**6, 10**6).map(lambda i: b":%d\r\n" % i),
    st.binary(max_size=90).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n", b"(123456789012345678901\r\n",
                     b"=7\r\ntxt:abc\r\n", b"!5\r\nERR x\r\n", b"%0\r\n", b"*0\r\n",
                     # lengths no stream reaches: Python's int() has no bound, C saturates
                     b"*-99999999999999999999\r\n", b"$-1152921504606846977\r\n", b"$99999999999999999999\r\n",
                     b"%1152921504606846977\r\n", b"* 3\r\n", b"$1_0\r\n0123456789\r\n"]),
)


def aggregate(children: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    def build(t: bytes, items: list[bytes]) -> bytes:
        if t in b"%|":
            items = items[: len(items) // 2 * 2]
            return t + b"%d\r\n" % (len(items) // 2) + b"".join(items)
        return t + b"%d\r\n" % len(items) + b"".join(items)

    return st.tuples(st.sampled_from([b"*", b"~", b">", b"%", b"|"]), children).map(lambda x: build(*x))


def headed(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Arrays and pushes shaped like pub/sub messages and confirmations (or nearly)."""
    def build(t: bytes, head: bytes, bulk: bool, rest: list[bytes]) -> bytes:
        h = b"$%d\r\n%s\r\n" % (len(head), head) if bulk else b"+" + head + b"\r\n"
        return t + b"%d\r\n" % (1 + len(rest)) + h + b"".join(rest)

    return st.builds(build, st.sampled_from([b"*", b">"]), st.sampled_from(HEADS), st.booleans(),
                     st.lists(children, max_size=3))


value = st.recursive(scalar, lambda kids: st.one_of(aggregate(st.lists(kids, max_size=4)), headed(kids)),
                     max_leaves=12)
# an attribute before a reply is legal RESP3
reply = st.one_of(value, st.tuples(st.lists(scalar, min_size=2, max_size=2), value).map(
    lambda x: b"|1\r\n" + b"".join(x[0]) + x[1]))


def run_framer(framer: object, chunks: list[bytes]) -> tuple[list, str | None]:
    out = []
    try:
        for c in chunks:
            frames = framer.feed(c)  # type: ignore[attr-defined]
            out.append((frames, framer.plain, framer.in_frame))  # type: ignore[attr-defined]
    except ProtocolError as exc:
        return out, str(exc)
    return out, None


@given(st.lists(reply, min_size=1, max_size=8), st.data())
@settings(max_examples=600 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_reply_framer_matches_reference(replies: list[bytes], data: st.DataObject) -> None:
    stream = mutate(data, b"".join(replies))
    chunks = chunked(stream, cuts_for(data, stream))
    c_out, c_err = run_framer(resp._speedups.ReplyFramer(), chunks)
    py_out, py_err = run_framer(resp.PyReplyFramer(), chunks)
    assert c_err == py_err
    assert c_out == py_out


def test_reply_framer_plain() -> None:
    f = resp._speedups.ReplyFramer()
    f.feed(b"+OK\r\n*2\r\n$3\r\nfoo\r\n:1\r\n$-1\r\n%1\r\n+a\r\n+b\r\n")
    assert f.plain
    for not_plain in [b"-ERR x\r\n", b">2\r\n+a\r\n+b\r\n", b"*3\r\n$7\r\nMessage\r\n+c\r\n+m\r\n", b"!1\r\nx\r\n"]:
        f.feed(not_plain)
        assert not f.plain, not_plain
        f.feed(b"+OK\r\n")
        assert f.plain


# -- requests ---------------------------------------------------------------------------------------
NAMES = [b"GET", b"get", b"Get", b"SET", b"set", b"INCR", b"PING", b"BRPOP", b"PUBLISH", b"MULTI", b"EXEC",
         b"CLIENT", b"SUBSCRIBE", b"NOSUCH", b"x" * 40, b""]
KEYS = [b"k1", b"k2", b"celery", b"user:123", b"a" * 70]

command = st.builds(
    lambda name, args: [name, *args],
    st.sampled_from(NAMES),
    st.lists(st.one_of(st.sampled_from(KEYS), st.binary(max_size=20)), max_size=4),
)
odd_request = st.sampled_from([
    b"PING\r\n", b"set a b\n", b"*0\r\n", b"*-1\r\n", b"\r\n", b"*01\r\n$4\r\nPING\r\n", b"*1\r\n$04\r\nPING\r\n",
    b"*1\r\n+PING\r\n", b"*1\r\n$4\r\nPINGxx", b"*2\r\n$3\r\nGET\r\n:1\r\n", b"*+1\r\n$4\r\nPING\r\n",
    b"*1\r\n$-1\r\n", b'"unbalanced\r\n', b"*1\r\n$2000\r\n" + b"x" * 2000 + b"\r\n",
])
request = st.one_of(command.map(encode_command), command.map(encode_command), odd_request)


def run_parser(parser: RequestParser, chunks: list[bytes]) -> tuple[list, str | None]:
    out = []
    for c in chunks:
        items, raw = parser.feed(c)
        cmds = expand(items, raw)
        assert parser.framed == len(cmds)
        out.append([(args, raw[s:e]) for args, s, e in cmds])
        if parser.error is not None:
            break
    return out, parser.error


def check_runs(items: list, raw: bytes, fast: dict | None) -> None:
    """Every run holds commands of its entry, with its pattern."""
    for it in items:
        if len(it) != 5:
            continue
        (name, timed), pat, n, s, e = it
        cmds, _ = RequestParser().feed(raw[s:e])
        assert len(cmds) == n
        for args, _s, _e in cmds:
            info = cmdtable.lookup(args)
            assert info is not None and info.name == name and timed is not info.blocking
            if fast is None:
                assert pat is None
            elif len(args) == 1:
                assert pat == NOKEY
            else:
                assert fast[args[1]] == pat


@given(st.lists(request, min_size=1, max_size=10), st.data())
@settings(max_examples=600 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_request_parser_matches_reference(requests: list[bytes], data: st.DataObject) -> None:
    stream = mutate(data, b"".join(requests))
    chunks = chunked(stream, cuts_for(data, stream))
    limits = data.draw(st.sampled_from([{}, {"max_bulk": 100, "max_query": 3000}]))
    fast = data.draw(st.sampled_from([None, {b"k1": "k*", b"user:123": "user:*"}]))

    import proxy.resp as r

    saved = r._c_scan
    r._c_scan = None
    try:
        py_out, py_err = run_parser(RequestParser(**limits), chunks)
    finally:
        r._c_scan = saved
    c_out, c_err = run_parser(RequestParser(**limits, names=PLAIN, fast=fast), chunks)
    assert c_err == py_err
    assert c_out == py_out
    # and the runs are what they claim to be
    p = RequestParser(**limits, names=PLAIN, fast=fast)
    for c in chunks:
        items, raw = p.feed(c)
        check_runs(items, raw, fast)


def test_expand_keeps_the_framing_parsers_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run framed under a larger --max-bulk than the default is expanded whole (it once vanished)."""
    monkeypatch.setattr(RequestParser.__init__, "__defaults__", (100, 10_000, None, None, frozenset()))
    data = encode_command([b"SET", b"k", b"v" * 500]) * 2
    p = RequestParser(max_bulk=1000, max_query=100_000, names=PLAIN)
    items, raw = p.feed(data)
    assert len(items) == 1 and items[0][2] == 2  # one run of two plain commands
    assert [c[0] for c in expand(items, raw)] == [[b"SET", b"k", b"v" * 500]] * 2


def test_a_slow_request_is_scanned_twice_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request arriving a byte at a time is not rescanned from its start on every read."""
    calls = 0
    real = resp._c_scan

    def counting(*a):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(*a)

    monkeypatch.setattr(resp, "_c_scan", counting)
    data = encode_command([b"MSET", *[b"k%d" % i for i in range(500)]])
    p = RequestParser(names=PLAIN)
    got = []
    for i in range(len(data)):
        got.append(p.feed(data[i : i + 1]))
    # the header line's bytes only (C and Python take turns until it is whole), then the Python
    # parser resumes argument by argument: not one scan from the start per byte (len(data) = 3,400)
    assert calls <= len(b"*501\r\n"), calls
    assert [c[0][0] for feed in got for c in expand(*feed)] == [b"MSET"]
    # and the next request is the C scanner's again
    calls = 0
    items, _ = p.feed(encode_command([b"GET", b"k"]))
    assert calls == 1 and len(items[0]) == 5


def test_runs_are_merged_and_split() -> None:
    p = RequestParser(names=PLAIN, fast={b"a": "a", b"b": "b"})
    data = b"".join(encode_command(c) for c in [
        [b"GET", b"a"], [b"get", b"a"], [b"GET", b"b"], [b"GET", b"new"], [b"MULTI"], [b"SET", b"a", b"1"]
    ])
    items, raw = p.feed(data)
    assert raw == data
    shapes = [(it[0][0], it[1], it[2]) if len(it) == 5 else it[0] for it in items]
    assert shapes == [("get", "a", 2), ("get", "b", 1), [b"GET", b"new"], [b"MULTI"], ("set", "a", 1)]
    assert p.framed == 6


def test_incomplete_request_waits_without_rescanning() -> None:
    value = b"v" * 100_000
    data = encode_command([b"SET", b"k", value])
    p = RequestParser(names=PLAIN)
    assert p.feed(data[:30]) == ([], b"")
    assert p._need == len(data)  # the whole request must be there before the next scan
    items, raw = p.feed(data[30:])
    assert raw == data and items[0][0][0] == "set" and items[0][2] == 1


# -- whole sessions ----------------------------------------------------------------------------------
REPLIES = [b"+OK\r\n", b"-ERR no\r\n", b":7\r\n", b"$1\r\nv\r\n", b"$-1\r\n", b"*2\r\n$1\r\na\r\n$1\r\nb\r\n",
           b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", b"%1\r\n+k\r\n+v\r\n"]
SESSION_CMDS = [
    [b"GET", b"k1"], [b"GET", b"user:9"], [b"SET", b"k1", b"v"], [b"INCR", b"n:1"], [b"ping"], [b"PING", b"x"],
    [b"BRPOP", b"celery", b"1"], [b"PUBLISH", b"ch", b"m"], [b"CONFIG", b"GET", b"x"], [b"FOO"], [b"ECHO", b"e"],
    [b"CLIENT", b"SETNAME", b"w1"], [b"MULTI"], [b"EXEC"], [b"DISCARD"], [b"WATCH", b"k1"],
]


def play_session(batches: list[tuple[list[bytes], list[bytes], list[int]]], pure: bool) -> tuple:
    import proxy.resp as r

    saved = r._c_scan, r.ReplyFramer
    if pure:
        r._c_scan, r.ReplyFramer = None, r.PyReplyFramer
    try:
        stats = Stats()
        stats.patterns = PatternTracker(clock=lambda: 1000.0)
        to_client: list[bytes] = []
        to_upstream: list[bytes] = []
        s = Session(stats, to_client.append, lambda: None, clock=lambda: 5.0)
        s.upstream_connected(to_upstream.append, lambda: None)
        def check() -> None:  # what the backlog bound counts is what is in flight
            assert s.queued == sum(e[4] for e in s.pending if type(e) is tuple)

        for cmds, replies, cuts in batches:
            s.client_data(b"".join(cmds))
            check()
            for chunk in chunked(b"".join(replies), cuts):
                s.upstream_data(chunk)
                check()
        hist = {k: (h.n, h.total, list(h.counts)) for k, h in stats.latency.items()}
        return (b"".join(to_client), b"".join(to_upstream), stats.commands, stats.upstream,
                stats.patterns.cur, hist, stats.pushes, stats.unpaired_replies, len(s.pending))
    finally:
        r._c_scan, r.ReplyFramer = saved


@given(st.lists(st.tuples(st.lists(st.sampled_from(SESSION_CMDS), min_size=1, max_size=20),
                          st.data()), min_size=1, max_size=5))
@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sessions_match_reference(batches: list) -> None:
    plan = []
    for cmds, data in batches:
        replies = [data.draw(st.sampled_from(REPLIES)) for _ in cmds]
        # some replies not yet arrived, some early (unpaired) ones are not generated: keep it paired
        held = data.draw(st.integers(0, len(replies)))
        cuts = data.draw(st.lists(st.integers(0, 200), max_size=4))
        plan.append(([encode_command(c) for c in cmds], replies[:held], cuts))
        if held < len(replies):
            plan.append(([], replies[held:], []))
    assert play_session(plan, pure=False) == play_session(plan, pure=True)


# -- the latency histogram ------------------------------------------------------------------------
@given(st.lists(st.tuples(st.one_of(st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
                                    st.sampled_from([0.0, 0.00005, 0.0001, 0.00025, 2.5, 10.0, 10.000001])),
                          st.integers(1, 1000)), max_size=200))
@settings(max_examples=300 * SCALE, deadline=None)
def test_histogram_matches_reference(samples: list) -> None:
    from proxy.metrics import LATENCY_BUCKETS, Histogram

    c, py = resp._speedups.Histogram(LATENCY_BUCKETS), Histogram()
    for seconds, n in samples:
        c.observe(seconds, n)
        py.observe(seconds, n)
    assert (c.n, c.total, list(c.counts)) == (py.n, py.total, py.counts)
    assert type(c.n) is int and type(c.total) is float


def test_histogram_is_the_c_one() -> None:
    from proxy.metrics import C_HISTOGRAM

    stats = Stats()
    stats.observe_latency("get", 0.0003, 2)
    assert C_HISTOGRAM and type(stats.latency["get"]) is resp._speedups.Histogram
    assert (stats.latency["get"].n, list(stats.latency["get"].counts)[3]) == (2, 2)
    with pytest.raises(TypeError):
        resp._speedups.Histogram((1, 2.0))  # bounds are floats


def test_c_histogram_survives_python_code_that_changes_its_buckets():
    """counts is a list Python code can reach (and an addition may run Python code): a histogram
    whose list lost its buckets says so, it does not read past the list's end."""
    from proxy.metrics import LATENCY_BUCKETS

    hist = resp._speedups.Histogram
    h = hist(LATENCY_BUCKETS)
    h.counts.clear()
    with pytest.raises(RuntimeError):
        h.observe(1.0, 1)

    class Clears(int):
        def __radd__(self, other):
            h2.counts.clear()
            return 5

    h2 = hist(LATENCY_BUCKETS)
    with pytest.raises(RuntimeError):
        h2.observe(1.0, Clears(1))
    h3 = hist(LATENCY_BUCKETS)
    h3.observe(0.001)  # (n defaults to 1, as in the Python Histogram)
    assert (h3.n, sum(h3.counts)) == (1, 1)
    h3.n = 2**63 - 1
    with pytest.raises(OverflowError):
        h3.observe(0.001, 1)
