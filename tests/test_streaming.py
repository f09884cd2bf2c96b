"""Large requests are streamed: the proxy holds a bounded window of any value (issue 10.6).

Framing three ways (whole, in small pieces, byte by byte at the start) keeps every byte, in order;
session playbooks show a streamed request forwarded as it arrives, answered and dropped by the
policy, held by a rate limit (reading pauses) and broken in the middle (both sides close)."""

from __future__ import annotations

import random

import pytest

from proxy.metrics import Stats
from proxy.resp import STREAM_MIN, RequestParser, encode_command, expand
from proxy.paths import STREAMABLE
from proxy.session import Admission, Session
from proxy.streaming import HELD_BACKLOG

pytestmark = pytest.mark.usefixtures("hot_path")

BIG = b"x" * (3 * STREAM_MIN)
SET_BIG = encode_command([b"SET", b"big", BIG, b"EX", b"100"])
MANY = encode_command([b"RPUSH", b"list"] + [b"e%d" % i for i in range(20_000)])
STREAM = (
    encode_command([b"GET", b"a"]) + SET_BIG + encode_command([b"PING"]) + MANY
    + encode_command([b"SET", b"k", b"v" * 1000]) + encode_command([b"GET", b"z"])
)


def frame(data: bytes, sizes, ok: bool = True):  # noqa: ANN001
    """Feed ``data`` in pieces; returns [("cmd", bytes) | ("streamed", bytes, head_args)] and the
    largest number of bytes the parser held at once."""
    p = RequestParser(streamable=STREAMABLE)
    out: list = []
    cur: bytearray | None = None
    head_args = None
    held = 0
    i = 0
    for size in sizes:
        if i >= len(data):
            break
        piece = data[i : i + size]
        i += len(piece)
        p.stream_ok = lambda: ok
        cmds, raw = p.feed(piece)
        assert p.error is None, p.error
        if p.pre is not None:
            assert cur is not None
            cur += p.pre
            p.pre = None
            if not p.streaming or p.head is not None:
                out.append(("streamed", bytes(cur), head_args))
                cur = None
        out.extend(("cmd", raw[s:e]) for _a, s, e in expand(cmds, raw))
        if p.head is not None:
            head_args, head = p.head
            p.head = None
            cur = bytearray(head)
        held = max(held, p.buffered)
    assert i >= len(data) and not p.pending
    return out, held


def sizes_whole():
    yield 1 << 40


def sizes_chunks(n: int):  # noqa: ANN201
    while True:
        yield n


def sizes_random(seed: int):  # noqa: ANN201
    rnd = random.Random(seed)
    while True:
        yield rnd.choice([1, 2, 7, 100, 4096, 65536, 200_000])


@pytest.mark.parametrize("how", ["whole", "64k", "random1", "random2", "bytewise-start"])
def test_every_byte_in_order_and_a_bounded_window(how: str) -> None:
    sizes = {
        "whole": sizes_whole(),
        "64k": sizes_chunks(65536),
        "random1": sizes_random(1),
        "random2": sizes_random(2),
        "bytewise-start": iter([1] * 3000 + [65536] * 10_000),
    }[how]
    out, held = frame(STREAM, sizes)
    assert b"".join(x[1] for x in out) == STREAM
    streamed = [x for x in out if x[0] == "streamed"]
    if how == "whole":
        assert not streamed  # complete requests are framed as always
    else:
        assert [x[1] for x in streamed][0] == SET_BIG
        assert streamed[0][2][:2] == [b"SET", b"big"] and streamed[0][2][2] == BIG[:256]
        assert held < STREAM_MIN + 200_000  # never the whole value
    # the commands around them are framed as usual
    small = [x[1] for x in out if x[0] == "cmd" and x[1] not in (SET_BIG, MANY)]
    assert small[:2] == [encode_command([b"GET", b"a"]), encode_command([b"PING"])]


def test_not_streamed_when_not_allowed_or_not_streamable() -> None:
    out, held = frame(SET_BIG, sizes_chunks(65536), ok=False)
    assert out == [("cmd", SET_BIG)] and held >= len(BIG)
    unknown = encode_command([b"NOSUCHCMD", BIG])
    out, _ = frame(unknown, sizes_chunks(65536))
    assert out == [("cmd", unknown)]
    blocking = encode_command([b"BLPOP", BIG, b"0"])  # its timeout comes last: held whole
    out, _ = frame(blocking, sizes_chunks(65536))
    assert out == [("cmd", blocking)]


VALUE = b"*5\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s" % (len(BIG), BIG)
assert SET_BIG.startswith(VALUE)


@pytest.mark.parametrize("bad,error", [
    (VALUE + b"XX$2\r\nEX\r\n$3\r\n100\r\n", "expected CRLF after bulk data"),
    (VALUE + b"\r\n*2\r\nEX\r\n$3\r\n100\r\n", "expected '$', got '*'"),
    (VALUE + b"\r\n$2x\r\nEX\r\n$3\r\n100\r\n", "invalid bulk length"),
    (VALUE + b"\r\n$" + b"9" * 70_000, "too big bulk count string"),
])
def test_bad_input_inside_a_stream_is_an_error(bad: bytes, error: str) -> None:
    p = RequestParser(streamable=STREAMABLE)
    p.stream_ok = lambda: True
    for i in range(0, len(bad), 65536):
        p.feed(bad[i : i + 65536])
        p.head = p.pre = None
        if p.error:
            break
    assert p.error is not None and error in p.error


class Policy:
    """A stand-in policy: REPLY for names in ``refuse``, WAIT for names in ``hold``."""

    def __init__(self, refuse=(), hold=()) -> None:  # noqa: ANN001
        self.refuse, self.hold = set(refuse), set(hold)
        self.holding = True

    def init_session(self, session: Session) -> None:
        pass

    def fast_admit(self, session: Session, n: int) -> bool:
        return False

    def fast_refund(self, session: Session, n: int) -> None:
        pass

    def admit(self, session, args, info, name):  # noqa: ANN001, ANN201
        if name in self.refuse:
            return Admission.REPLY, b"-ERR refused\r\n", "rejected:cap"
        if name in self.hold and self.holding:
            return Admission.WAIT, None, ""
        return Admission.FORWARD, None, ""


class Play:
    def __init__(self, policy=None) -> None:  # noqa: ANN001
        self.stats = Stats()
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.closed = []
        self.s = Session(self.stats, self.to_client.append, lambda: self.closed.append("client"), policy=policy)
        self.s.upstream_connected(self.to_upstream.append, lambda: self.closed.append("upstream"))

    def send(self, data: bytes, size: int = 65536) -> None:
        for i in range(0, len(data), size):
            self.s.client_data(data[i : i + size])


def test_a_streamed_request_goes_upstream_as_it_arrives() -> None:
    p = Play()
    p.send(encode_command([b"GET", b"a"]) + SET_BIG[: STREAM_MIN + 1000])
    sent = b"".join(p.to_upstream)
    assert sent == encode_command([b"GET", b"a"]) + SET_BIG[: STREAM_MIN + 1000]  # nothing held back
    assert p.s.parser.buffered < 70_000
    p.send(SET_BIG[STREAM_MIN + 1000 :] + encode_command([b"PING"]))
    assert b"".join(p.to_upstream) == encode_command([b"GET", b"a"]) + SET_BIG + encode_command([b"PING"])
    p.s.upstream_data(b"$-1\r\n+OK\r\n+PONG\r\n")
    assert b"".join(p.to_client) == b"$-1\r\n+OK\r\n+PONG\r\n"
    assert p.stats.upstream_by_command() == {"get": 1, "set": 1, "ping": 1}
    assert p.stats.commands[("anonymous", "set", "ok")] == 1
    assert p.s.idle


def test_a_refused_streamed_request_is_read_and_dropped() -> None:
    p = Play(Policy(refuse={"set"}))
    p.send(SET_BIG + encode_command([b"GET", b"a"]))
    assert b"".join(p.to_upstream) == encode_command([b"GET", b"a"])
    p.s.upstream_data(b"$1\r\nx\r\n")
    assert b"".join(p.to_client) == b"-ERR refused\r\n$1\r\nx\r\n"
    assert p.stats.commands[("anonymous", "set", "rejected")] == 1


def test_a_streamed_request_held_by_a_rate_limit_pauses_reading() -> None:
    policy = Policy(hold={"set"})
    p = Play(policy)
    p.send(SET_BIG[:STREAM_MIN + 100])
    assert p.to_upstream == [] and p.s.backlog >= HELD_BACKLOG  # the I/O layer stops reading
    policy.holding = False
    p.s.resume()
    assert b"".join(p.to_upstream) == SET_BIG[:STREAM_MIN + 100]
    assert p.s.backlog < HELD_BACKLOG
    p.send(SET_BIG[STREAM_MIN + 100 :])
    assert b"".join(p.to_upstream) == SET_BIG


def test_a_stream_broken_in_the_middle_closes_both_sides() -> None:
    p = Play()
    p.send(encode_command([b"GET", b"a"]) + SET_BIG[: STREAM_MIN + 10])
    p.send(b"garbage-instead-of-the-rest" + b"\r\n" * 300_000)  # longer than the value: CRLF check fails
    assert b"Protocol error" in b"".join(p.to_client)
    assert "upstream" in p.closed and "client" in p.closed
    assert p.stats.protocol_errors == 1


def _frame_all(data: bytes, seed: int, ok: bool):  # noqa: ANN202
    """Every request's bytes (streamed ones joined), and the error, over random splits."""
    rnd = random.Random(seed)
    p = RequestParser(streamable=STREAMABLE)
    p.stream_ok = lambda: ok
    global _heads
    out: list[bytes] = []
    cur: bytearray | None = None
    i = 0
    while i < len(data) and p.error is None:
        piece = data[i : i + rnd.choice([1, 2, 3, 7, 100, 4096, 65536, 262144, 1 << 30])]
        i += len(piece)
        cmds, raw = p.feed(piece)
        if p.pre is not None:
            assert cur is not None
            cur += p.pre
            p.pre = None
            if (not p.streaming and p.error is None) or p.head is not None:
                out.append(bytes(cur))
                cur = None
        out.extend(raw[s:e] for _a, s, e in expand(cmds, raw))
        if p.head is not None:
            cur = bytearray(p.head[1])
            p.head = None
            _heads += 1
    return out, p.error


_heads = 0


@pytest.mark.parametrize("seed", range(4))
def test_streaming_frames_exactly_as_holding_does(seed: int) -> None:
    """Random requests (small, large, many-argument), damaged or not, over random splits: the
    streaming framer gives the same requests, byte for byte, and the same error as the one that
    holds every request whole."""
    rnd = random.Random(seed)
    for it in range(25):
        reqs = []
        for _ in range(rnd.randint(1, 5)):
            name = rnd.choice([b"SET", b"GET", b"RPUSH", b"APPEND", b"PING"])
            many = name == b"RPUSH" and rnd.random() < 0.3
            args = [name] + [
                bytes([rnd.randint(0, 255)]) * (rnd.randint(0, 8) if many else
                                                rnd.choice([0, 1, 300, 70_000, STREAM_MIN + rnd.randint(0, 9999)]))
                for _ in range(5000 if many else rnd.randint(0, 3))
            ]
            reqs.append(encode_command(args))
        data = b"".join(reqs)
        if rnd.random() < 0.3:
            pos = rnd.randrange(len(data))
            data = data[:pos] + bytes([rnd.choice(b"*$\r\nx0")]) + data[pos + 1 :]
        held, held_err = _frame_all(data, seed * 1000 + it, False)
        streamed, streamed_err = _frame_all(data, seed * 1000 + it + 500, True)
        assert streamed_err == held_err, it
        assert streamed == held, it
    assert _heads > 0  # (requests were streamed)
