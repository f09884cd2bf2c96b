"""RESP framing without sockets. Every case runs three ways: the whole buffer at once, byte by byte,
and followed by trailing bytes that must be left over (h11's test_io style)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import resp
from proxy.resp import (
    KIND_ARRAY,
    KIND_ERROR,
    KIND_NORMAL,
    KIND_PUSH,
    ProtocolError,
    RequestParser,
    encode_command,
    split_inline,
)


pytestmark = pytest.mark.usefixtures("hot_path")


def feed_requests(parser: RequestParser, chunks: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Feed chunks; return the commands and the raw bytes of each (from the parser's offsets)."""
    cmds: list[list[bytes]] = []
    raws: list[bytes] = []
    for c in chunks:
        got, raw = parser.feed(c)
        for args, s, e in got:
            cmds.append(args)
            raws.append(raw[s:e])
    return cmds, raws


def three_ways(data: bytes):
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    yield "halves", [data[: len(data) // 2], data[len(data) // 2 :]]


REQUEST_CASES = [
    (b"*1\r\n$4\r\nPING\r\n", [[b"PING"]]),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n", [[b"SET", b"k", b"v\r\n"]]),
    (b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", [[b"GET", b""]]),
    (b"PING\r\n", [[b"PING"]]),
    (b"PING\n", [[b"PING"]]),
    (b'SET k "a b\\x41\\n"\r\n', [[b"SET", b"k", b"a bA\n"]]),
    (b"SET k 'it\\'s'\r\n", [[b"SET", b"k", b"it's"]]),
    (b"\r\n\r\nPING\r\n", [[b"PING"]]),  # blank inline lines are skipped
    (b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n", [[b"PING"]]),  # empty multibulks are skipped
    (
        b"*1\r\n$4\r\nPING\r\nECHO hi\r\n*2\r\n$4\r\nECHO\r\n$2\r\nyo\r\n",
        [[b"PING"], [b"ECHO", b"hi"], [b"ECHO", b"yo"]],
    ),
    (b"*2\r\n$3\r\nGET\r\n$5\r\na\x00b\rc\r\n", [[b"GET", b"a\x00b\rc"]]),
]


@pytest.mark.parametrize("data,expected", REQUEST_CASES)
def test_requests_three_ways(data: bytes, expected: list[list[bytes]]) -> None:
    for how, chunks in three_ways(data):
        p = RequestParser()
        cmds, raws = feed_requests(p, chunks)
        assert cmds == expected, how
        assert p.error is None
        assert not p.pending, how
        # The raw ranges are the exact bytes of each command, in order.
        joined = b"".join(raws)
        assert joined in data, how
    # trailing partial command stays buffered and completes later
    p = RequestParser()
    cmds, _ = feed_requests(p, [data + b"*2\r\n$3\r\nGET\r\n$1\r\n"])
    assert cmds == expected
    assert p.pending
    cmds, raws = feed_requests(p, [b"x\r\n"])
    assert cmds == [[b"GET", b"x"]]
    assert raws == [b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n"]


def test_raw_bytes_cover_each_command_exactly() -> None:
    a = encode_command([b"SET", b"k", b"v" * 10])
    b = encode_command([b"GET", b"k"])
    for how, chunks in three_ways(a + b):
        p = RequestParser()
        _, raws = feed_requests(p, chunks)
        assert raws == [a, b], how


@pytest.mark.parametrize(
    "data,message",
    [
        (b"*1\r\n:5\r\n", "Protocol error: expected '$', got ':'"),
        (b"*x\r\n", "Protocol error: invalid multibulk length"),
        (b"*01\r\n$4\r\nPING\r\n", "Protocol error: invalid multibulk length"),
        (b"*1\r\n$-5\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$ 4\r\nPING\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$04\r\nPING\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$4\r\nPINGxx", "Protocol error: expected CRLF after bulk data"),
        (b"*2\r\n*1\r\n$1\r\na\r\n", "Protocol error: expected '$', got '*'"),
        (b'SET k "abc\r\n', "Protocol error: unbalanced quotes in request"),
        (b"SET k 'a'b\r\n", "Protocol error: unbalanced quotes in request"),
    ],
)
def test_request_errors(data: bytes, message: str) -> None:
    for how, chunks in three_ways(data):
        p = RequestParser()
        feed_requests(p, chunks)
        assert p.error == message, how


def test_commands_before_an_error_are_kept() -> None:
    p = RequestParser()
    cmds, raw = p.feed(b"*1\r\n$4\r\nPING\r\n*1\r\n:1\r\n*1\r\n$4\r\nPING\r\n")
    assert [c[0] for c in cmds] == [[b"PING"]]
    assert raw == b"*1\r\n$4\r\nPING\r\n"
    assert p.error is not None
    assert p.feed(b"*1\r\n$4\r\nPING\r\n") == ([], b"")  # nothing more after an error


def test_limits() -> None:
    p = RequestParser(max_bulk=10)
    p.feed(b"*1\r\n$11\r\n")
    assert p.error == "Protocol error: invalid bulk length"
    p = RequestParser()
    p.feed(b"X" * (resp.MAX_INLINE + 1))
    assert p.error == "Protocol error: too big inline request"
    p = RequestParser()
    p.feed(b"*" + b"1" * (resp.MAX_INLINE + 1))
    assert p.error == "Protocol error: too big mbulk count string"
    p = RequestParser(max_query=1000)
    p.feed(b"*1\r\n$2000\r\n" + b"x" * 500)
    assert p.error is None
    p.feed(b"x" * 600)
    assert p.error == "Protocol error: query buffer limit exceeded"
    p = RequestParser()
    p.feed(b"*3000000000\r\n")
    assert p.error == "Protocol error: invalid multibulk length"


def test_large_bulk_in_small_chunks_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5 MiB value arriving in 4 KiB chunks is not rescanned per chunk."""
    value = bytes(range(256)) * (5 * 4096)
    data = encode_command([b"SET", b"big", value])
    p = RequestParser()
    calls = 0

    def counting(orig):  # type: ignore[no-untyped-def]
        def scan(self, *scanned):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return orig(self, *scanned)

        return scan

    monkeypatch.setattr(RequestParser, "_scan", counting(RequestParser._scan))
    monkeypatch.setattr(RequestParser, "_scan_c", counting(RequestParser._scan_c))
    cmds, raws = feed_requests(p, [data[i : i + 4096] for i in range(0, len(data), 4096)])
    assert cmds == [[b"SET", b"big", value]]
    assert raws == [data]
    assert calls < 10


def test_long_multibulk_resumes() -> None:
    args = [b"DEL"] + [b"k%d" % i for i in range(20000)]
    data = encode_command(args)
    p = RequestParser()
    cmds, raws = feed_requests(p, [data[i : i + 1000] for i in range(0, len(data), 1000)])
    assert cmds == [args]
    assert raws == [data]


def test_fast_path_rejects_what_redis_would_not_accept() -> None:
    # hiredis alone would accept these; the canonical check sends them to the exact parser.
    for data, err in [
        (b"*1\r\n+PING\r\n", "Protocol error: expected '$', got '+'"),
        (b"*1\r\n$4\r\nPINGXY", "Protocol error: expected CRLF after bulk data"),
        (b"*1\r\n$4\r\nPING\r\n~1\r\n$4\r\nPING\r\n", None),
    ]:
        p = RequestParser()
        cmds, _ = p.feed(data)
        assert p.error == err
    # '~1' is an inline command to Redis: the exact parser frames it as such.
    p = RequestParser()
    cmds, _ = p.feed(b"*1\r\n$4\r\nPING\r\n~1\r\n$4\r\nPING\r\n")
    assert [c[0] for c in cmds] == [[b"PING"], [b"~1"], [b"$4"], [b"PING"]]


@given(st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8), st.data())
@settings(max_examples=300, deadline=None)
def test_roundtrip_any_split(commands: list[list[bytes]], data: st.DataObject) -> None:
    encoded = b"".join(encode_command(c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=6)))
    chunks = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)])]
    p = RequestParser()
    cmds, raws = feed_requests(p, chunks)
    assert cmds == commands
    assert b"".join(raws) == encoded


@given(st.binary(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_request_parser_never_crashes(data: bytes) -> None:
    p = RequestParser(max_bulk=1000, max_query=10_000)
    for how, chunks in three_ways(data):
        p = RequestParser(max_bulk=1000, max_query=10_000)
        feed_requests(p, chunks)  # no exception other than via p.error


def test_split_inline() -> None:
    assert split_inline(b"a  b\tc") == [b"a", b"b", b"c"]
    assert split_inline(b'"\\x4a\\x4b" \'q\'') == [b"JK", b"q"]
    assert split_inline(b'""') == [b""]
    with pytest.raises(ProtocolError):
        split_inline(b'"abc')


# -- replies ------------------------------------------------------------------------------------

REPLY_CASES = [
    (b"+OK\r\n", [(KIND_NORMAL, None, None)]),
    (b"-ERR wrong\r\n", [(KIND_ERROR, None, None)]),
    (b":42\r\n", [(KIND_NORMAL, None, None)]),
    (b"$5\r\nab\r\nc\r\n", [(KIND_NORMAL, None, None)]),
    (b"$-1\r\n", [(KIND_NORMAL, None, None)]),
    (b"*-1\r\n", [(KIND_NORMAL, None, None)]),  # a null, not an array
    (b"*0\r\n", [(KIND_ARRAY, None, None)]),
    (
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n",
        [(KIND_ARRAY, b"message", None)],
    ),
    (b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", [(KIND_ARRAY, b"subscribe", 1)]),
    (b">3\r\n+message\r\n+ch\r\n+x\r\n", [(KIND_PUSH, b"message", None)]),
    (b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n:1\r\n:2\r\n", [(KIND_NORMAL, b"a", None)]),
    (b"~2\r\n,1.5\r\n(12345678901234567890\r\n", [(KIND_NORMAL, None, None)]),
    (b"=15\r\ntxt:Some string\r\n", [(KIND_NORMAL, None, None)]),
    (b"!21\r\nSYNTAX invalid syntax\r\n", [(KIND_ERROR, None, None)]),
    (b"_\r\n#t\r\n,inf\r\n", [(KIND_NORMAL, None, None)] * 3),
    # an attribute prefixes the reply it annotates: one frame, of the reply's kind
    (b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2\r\n:9\r\n", [(KIND_ARRAY, None, None)]),
    (b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n", [(KIND_ARRAY, None, None)]),
    (b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n:3\r\n", [(KIND_ARRAY, None, None)]),
]


@pytest.mark.parametrize("data,expected", REPLY_CASES)
def test_replies_three_ways(data: bytes, expected: list) -> None:
    for how, chunks in three_ways(data):
        f = resp.ReplyFramer()
        got = []
        offset = 0
        for c in chunks:
            for end, kind, head, num in f.feed(c):
                got.append((offset + end, kind, head, num))
            offset += len(c)
        assert [(k, h, n) for _, k, h, n in got] == expected, how
        assert got[-1][0] == len(data), how
        assert not f.in_frame, how
    f = resp.ReplyFramer()
    frames = f.feed(data + b"$9\r\npart")
    assert len(frames) == len(expected)
    assert f.in_frame
    assert f.feed(b"ial!!\r\n") == [(7, KIND_NORMAL, None, None)]


def test_reply_errors() -> None:
    with pytest.raises(ProtocolError):
        resp.ReplyFramer().feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        resp.ReplyFramer().feed(b"$abc\r\n")


def test_big_reply_is_not_buffered() -> None:
    f = resp.ReplyFramer()
    chunk = b"x" * 1000
    tracemalloc.start()
    try:
        assert f.feed(b"$10000000\r\n" + chunk) == []
        for _ in range(9999):
            assert f.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, peak  # a 10 MB payload passed through, never held
    assert f.in_frame
    assert f.feed(b"\r\n+OK\r\n") == [(2, KIND_NORMAL, None, None), (7, KIND_NORMAL, None, None)]
