"""Fuzz the proxy's request side over real sockets: 10,000 random or mutated RESP inputs.

Inputs come from a seeded generator that mutates valid commands (truncation, bit flips, bogus and
huge lengths, nested arrays, inline garbage, raw binary). They are sent over many concurrent
connections; each connection is reused until the proxy closes it (after a protocol error) or it
gets stuck on an incomplete request. Meanwhile a well-behaved redis-py client keeps doing SET/GET
through the same proxy and must never see a wrong answer or an error.

The server behind the proxy is a private one whose default user may not run @dangerous or
@blocking commands, so random bytes cannot shut it down, flush it or kill other clients.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest


from support import encode_resp

N_INPUTS = 10_000
WORKERS = 48
STUCK_AFTER = 0.25  # seconds without our sentinel reply: the request is incomplete, start over
SEED = 20241125

BASE = [
    encode_resp("SET", "fz:k", "v\r\n\x00x"),
    encode_resp("GET", "fz:k"),
    encode_resp("INCR", "fz:n"),
    encode_resp("LPUSH", "fz:l", "a", "b", "c"),
    encode_resp("LRANGE", "fz:l", "0", "-1"),
    encode_resp("HSET", "fz:h", "f", "v", "g", "w"),
    encode_resp("HGETALL", "fz:h"),
    encode_resp("MGET", "fz:k", "fz:n", "fz:missing"),
    encode_resp("DEL", "fz:tmp"),
    encode_resp("ECHO", "hello"),
    encode_resp("PING"),
    encode_resp("EXISTS", "fz:k", "fz:l"),
    encode_resp("SETRANGE", "fz:r", "3", "abc"),
    encode_resp("EVAL", "return ARGV[1]", "0", "x"),
    encode_resp("HELLO", "3"),
    encode_resp("HELLO", "2"),
    encode_resp("CLIENT", "SETNAME", "fuzzer"),
    encode_resp("NOSUCHCOMMAND", "x"),
    b"PING\r\n",
    b'SET fz:i "a b\\x41" \r\n',
    b"GET fz:i\n",
    b"\r\n",
    b"*0\r\n",
    b"*-1\r\n",
]


def _ascii_int(rnd: random.Random) -> bytes:
    return rnd.choice([
        b"-1", b"-2", b"0", b"00", b"01", b"+3", b" 3", b"3 ", b"", b"x", b"1_0", b"0x10",
        b"2147483647", b"2147483648", b"4294967296", b"9223372036854775807",
        b"9223372036854775808", b"99999999999999999999999", b"536870912", b"536870913",
        b"-9223372036854775808", str(rnd.randrange(0, 100)).encode(),
    ])


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    kind = rnd.randrange(10)
    if kind == 0:  # truncation
        return data[: rnd.randrange(0, max(1, len(data)))]
    if kind == 1:  # bit flips
        b = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if kind == 2:  # bogus lengths: replace one length field
        parts = data.split(b"\r\n")
        idx = [i for i, p in enumerate(parts) if p[:1] in (b"*", b"$")]
        if idx:
            i = rnd.choice(idx)
            parts[i] = parts[i][:1] + _ascii_int(rnd)
        return b"\r\n".join(parts)
    if kind == 3:  # huge lengths
        return rnd.choice([
            b"*2147483648\r\n", b"*1\r\n$536870913\r\n", b"*1\r\n$99999999999\r\n",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$500000000\r\nabc",
            b"*1048576\r\n$4\r\nPING\r\n", b"*1\r\n$" + b"9" * 40 + b"\r\n",
        ])
    if kind == 4:  # nested arrays / other RESP types where bulks belong
        inner = rnd.choice([b"*1\r\n$4\r\nPING\r\n", b"+OK\r\n", b":1\r\n", b"%1\r\n+a\r\n+b\r\n",
                            b"_\r\n", b"#t\r\n", b",1.5\r\n", b">1\r\n+x\r\n", b"*-1\r\n"])
        return b"*2\r\n$4\r\nECHO\r\n" + inner if rnd.random() < 0.5 else b"*1\r\n" + inner
    if kind == 5:  # inline garbage
        alphabet = b"abcXYZ \t'\"\\x01{}$*-:+\r"
        line = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 60)))
        return line + rnd.choice([b"\r\n", b"\n", b""])
    if kind == 6:  # raw binary
        return rnd.randbytes(rnd.randrange(1, 200))
    if kind == 7:  # a valid command with one byte inserted or deleted
        b = bytearray(data)
        i = rnd.randrange(len(b) + 1)
        if rnd.random() < 0.5 or not b:
            b[i:i] = bytes([rnd.randrange(256)])
        else:
            del b[min(i, len(b) - 1)]
        return bytes(b)
    if kind == 8:  # a pipeline of valid commands with garbage in the middle
        return b"".join(rnd.choice(BASE) for _ in range(3)) + _mutate(rnd, rnd.choice(BASE))
    return data  # unmutated: valid traffic keeps flowing too


def generate(n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [_mutate(rnd, rnd.choice(BASE)) for _ in range(n)]


class Checker(threading.Thread):
    """A well-behaved redis-py client doing SET/GET through the proxy the whole time."""

    def __init__(self, proxy) -> None:
        super().__init__(daemon=True)
        self.client = proxy.client()
        self.stop = threading.Event()
        self.checks = 0
        self.failures: list[str] = []

    def run(self) -> None:
        rnd = random.Random(1)
        i = 0
        while not self.stop.is_set():
            i += 1
            key = f"ok-check:{i % 50}"
            value = rnd.randbytes(rnd.randrange(1, 2000))
            try:
                assert self.client.set(key, value) is True
                got = self.client.get(key)
                if got != value:
                    self.failures.append(f"{key}: got {got!r:.80} expected {value!r:.80}")
                self.checks += 1
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                return
            time.sleep(0.005)


async def _worker(host: str, port: int, inputs: list[bytes], wid: int, stats: dict) -> None:
    reader = writer = None
    for j, data in enumerate(inputs):
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
            stats["connections"] += 1
        token = b"tok%dx%d" % (wid, j)
        # an inline sentinel, preceded by CRLF so it also ends an unterminated inline line
        try:
            writer.write(data + b"\r\nECHO " + token + b"\r\n")
            buf = b""
            deadline = asyncio.get_running_loop().time() + STUCK_AFTER
            outcome = None
            while outcome is None:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    outcome = "stuck"
                    break
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), left)
                except asyncio.TimeoutError:
                    outcome = "stuck"
                    break
                if not chunk:
                    outcome = "closed"
                    break
                buf += chunk
                if token in buf:
                    outcome = "answered"
        except (ConnectionError, OSError):
            outcome = "closed"
        stats[outcome] += 1
        if outcome != "answered":
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            reader = writer = None
    if writer is not None:
        writer.close()


async def _fuzz(host: str, port: int, inputs: list[bytes], stats: dict) -> None:
    chunks = [inputs[i::WORKERS] for i in range(WORKERS)]
    await asyncio.gather(*(_worker(host, port, c, i, stats) for i, c in enumerate(chunks)))


@pytest.mark.slow
def test_fuzzed_requests_never_crash_the_proxy(redis_factory, proxy_factory):
    server = redis_factory([
        "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-@dangerous", "-@blocking",
        "--user", "observer", "on", ">observer-pw", "~*", "&*", "+@all",
    ])
    proxy = proxy_factory(server, log_level="info")
    inputs = generate(N_INPUTS, SEED)
    assert len(inputs) == N_INPUTS
    checker = Checker(proxy)
    checker.start()
    stats = {"answered": 0, "closed": 0, "stuck": 0, "connections": 0}
    t0 = time.monotonic()
    try:
        # in slices, checking the proxy between them
        step = N_INPUTS // 10
        for k in range(0, N_INPUTS, step):
            t_slice = time.monotonic()
            asyncio.run(_fuzz(proxy.host, proxy.port, inputs[k : k + step], stats))
            # liveness, not speed: a slice normally takes ~1-2 s; tens of seconds means the
            # proxy's event loop stalled
            assert time.monotonic() - t_slice < 30, f"slice {k}: proxy stalled; {stats}"
            assert proxy.is_running(), proxy.log_text()[-5000:]
            assert "respmeter_commands_total" in proxy.metrics_text()
            assert not checker.failures, checker.failures[:5]
    finally:
        checker.stop.set()
        checker.join(10)
    elapsed = time.monotonic() - t0
    print(f"fuzz: {stats} in {elapsed:.1f}s; checker did {checker.checks} SET/GET checks")
    assert sum(stats[k] for k in ("answered", "closed", "stuck")) == N_INPUTS
    assert not checker.failures, checker.failures[:5]
    assert checker.checks >= 50
    # the mix really exercised all paths
    assert stats["answered"] > 1000 and stats["closed"] > 500 and stats["stuck"] > 0, stats
    assert proxy.metric_sum("respmeter_protocol_errors_total", by=())[()] >= stats["closed"] * 0.5
    # still fully working, and nothing leaked
    c = proxy.client()
    assert c.set("after-fuzz", "ok") is True and c.get("after-fuzz") == b"ok"
    assert proxy.healthz()[0] == 200
    deadline = time.monotonic() + 5
    while proxy.metric_sum("respmeter_client_connections", by=())[()] > 2:  # checker + c
        assert time.monotonic() < deadline, proxy.metric_sum("respmeter_client_connections", by=())
        time.sleep(0.1)
    obs = server.client(username="observer", password="observer-pw")
    deadline = time.monotonic() + 5
    while len(obs.client_list()) > 3:  # observer + checker + c upstream connections
        assert time.monotonic() < deadline, [x.get("cmd") for x in obs.client_list()]
        time.sleep(0.1)
    log = proxy.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:5000]
    assert proxy.is_running()
