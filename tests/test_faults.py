"""Faults: malformed and oversized requests, an unreachable or dying upstream, clients that vanish or
read slowly, and graceful shutdown -- all with real processes over loopback."""

from __future__ import annotations

import signal
import socket
import time

import pytest
import redis

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import RespError, RespSocket, commandstats, commandstats_delta, encode_resp


def _wait_until(pred, timeout=5.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def _upstream_conns(observer) -> int:
    """Connections on the server other than the observer's own."""
    return len(observer.client_list()) - 1




# --------------------------------------------------------------------------------------------
# malformed requests
# --------------------------------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"*abc\r\n", id="bad-multibulk-length"),
    pytest.param(b"*1\r\n+PING\r\n", id="not-a-bulk"),
    pytest.param(b"*2\r\n$3\r\nGET\r\n$-5\r\n", id="negative-bulk-length"),
    pytest.param(b"*1\r\n$4\r\nPINGxx\r\n", id="no-crlf-after-bulk"),
    pytest.param(b"*1\r\n$04\r\nPING\r\n", id="leading-zero-length"),
    pytest.param(b'SET k "unbalanced\r\n', id="inline-unbalanced-quotes"),
    pytest.param(b"*99999999999\r\n", id="huge-multibulk-count"),
]


@pytest.mark.parametrize("when", ["first-write", "after-traffic"])
@pytest.mark.parametrize("garbage", MALFORMED)
def test_malformed_request_gets_protocol_error_and_only_that_connection_closes(
    redis_server, proxy_factory, garbage, when
):
    """``first-write``: the garbage arrives in the connection's very first write (before the proxy's
    upstream connection is up); ``after-traffic``: after a completed round trip."""
    proxy = proxy_factory(redis_server)
    good = proxy.client()
    good.set("faults:good", "1")
    with RespSocket(proxy.host, proxy.port) as bad:
        if when == "after-traffic":
            assert bad.call("ECHO", "hi") == b"hi"
        # a valid command first, in the same write: it is answered before the error
        bad.send(encode_resp("PING") + garbage)
        assert bad.read() == b"PONG"
        err = bad.read()
        assert isinstance(err, RespError) and err.startswith("ERR Protocol error: "), err
        assert bad.closed_by_peer(5), "connection not closed after a protocol error"
    # the other client is unaffected, on the same connection
    assert good.get("faults:good") == b"1"
    assert good.incr("faults:ctr") >= 1
    assert proxy.metric_sum("respmeter_protocol_errors_total", by=())[()] == 1
    assert proxy.is_running()


def test_protocol_error_closes_the_upstream_connection_too(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    obs.ping()
    with RespSocket(proxy.host, proxy.port) as bad:
        assert bad.call("PING") == b"PONG"
        assert _upstream_conns(obs) == 1
        bad.send(b"*1\r\n$x\r\n")
        assert isinstance(bad.read(), RespError)
        assert bad.closed_by_peer(5)
    _wait_until(lambda: _upstream_conns(obs) == 0, what="upstream connection to close")


@pytest.mark.parametrize("when", ["first-write", "after-traffic"])
def test_oversized_bulk_is_refused(redis_factory, proxy_factory, when):
    server = redis_factory()
    proxy = proxy_factory(server, ["--max-bulk", "1kb"])
    obs = server.client()
    before = commandstats(obs)
    c = proxy.client()
    assert c.set("fits", b"x" * 1024) is True  # exactly the limit is fine
    with RespSocket(proxy.host, proxy.port) as s:
        if when == "after-traffic":
            assert s.call("PING") == b"PONG"
        # only the header of a 2000-byte bulk: refused before the payload is even sent
        s.send(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$2000\r\n")
        err = s.read()
        assert isinstance(err, RespError) and err.startswith("ERR Protocol error:"), err
        assert "bulk" in err.lower()
        assert s.closed_by_peer(5)
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        c.set("big2", b"y" * 5000)
    assert obs.exists("big", "big2") == 0
    good = proxy.client()
    assert good.get("fits") == b"x" * 1024
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("set") == 1  # the oversized SETs never reached the server


# --------------------------------------------------------------------------------------------
# upstream unavailable / health
# --------------------------------------------------------------------------------------------


def test_unreachable_upstream_then_recovery_and_healthz(proxy_factory, monkeypatch, tmp_path):
    port = support.free_port()
    proxy = proxy_factory(f"redis://127.0.0.1:{port}", ["--connect-timeout", "1"])
    with RespSocket(proxy.host, proxy.port) as s:
        t0 = time.monotonic()
        s.send(encode_resp("PING"))
        err = s.read()
        elapsed = time.monotonic() - t0
        assert isinstance(err, RespError) and err.startswith("ERR upstream unavailable: "), err
        assert elapsed < 2.0
        assert s.closed_by_peer(3)
    # redis-py sees the same error
    with pytest.raises((redis.ResponseError, redis.ConnectionError), match="upstream unavailable"):
        proxy.client().ping()
    status, body = proxy.healthz()
    assert status == 503, body
    assert body.strip() and ("refused" in body or "unreachable" in body), body

    # now the upstream appears on that very port
    monkeypatch.setattr(support, "free_port", lambda host="127.0.0.1": port)
    server = support.RedisServer(workdir=tmp_path / "late-redis")
    server.start()
    monkeypatch.undo()
    try:
        assert server.port == port
        obs = server.client()
        before = commandstats(obs)
        t0 = time.monotonic()
        statuses = []
        while True:
            status, body = proxy.healthz()
            statuses.append(status)
            if status == 200:
                break
            assert time.monotonic() - t0 < 5.0, (
                f"/healthz still {status} {body!r} 5 s after the upstream came back "
                f"(no client traffic in between)")
            time.sleep(0.1)
        # /healthz never sends commands upstream
        for _ in range(20):
            status, body = proxy.healthz()
            assert status == 200, body
        assert commandstats_delta(before, commandstats(obs)) == {}
        assert proxy.client().ping() is True
    finally:
        server.stop()


def test_healthz_sends_no_commands(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    before = commandstats(obs)
    for _ in range(20):
        status, body = proxy.healthz()
        assert status == 200, body
    assert commandstats_delta(before, commandstats(obs)) == {}
    assert proxy.metric_sum("respmeter_upstream_commands_total", by=()) in ({}, {(): 0.0})


def test_upstream_killed_closes_client_connection(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--connect-timeout", "1"])
    with RespSocket(proxy.host, proxy.port) as idle, RespSocket(proxy.host, proxy.port) as blocked:
        assert idle.call("PING") == b"PONG"
        blocked.command("BRPOP", "never", "0")
        obs = server.client()
        _wait_until(lambda: obs.info("clients")["blocked_clients"] == 1, what="BRPOP to block")
        server.kill()
        assert idle.closed_by_peer(5), "idle client not closed when the upstream died"
        assert blocked.closed_by_peer(5), "blocked client not closed when the upstream died"
    assert proxy.is_running()
    with RespSocket(proxy.host, proxy.port) as s:
        r = s.call("PING")
        assert isinstance(r, RespError) and r.startswith("ERR upstream unavailable"), r
    # the upstream is gone and a connect has just failed: /healthz must say so
    deadline = time.monotonic() + 3
    while True:
        status, body = proxy.healthz()
        if status == 503:
            break
        assert time.monotonic() < deadline, f"/healthz {status} {body!r} with the upstream dead"
        time.sleep(0.1)
    assert "refused" in body or "unreachable" in body, body
    text = proxy.metrics_text()
    assert "respmeter_upstream_errors_total" in text


# --------------------------------------------------------------------------------------------
# clients that vanish or read slowly
# --------------------------------------------------------------------------------------------


def test_client_vanishing_mid_pipeline_closes_its_upstream(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    obs.set("v1k", b"v" * 1024)
    other = proxy.client()
    assert other.ping() is True
    base = _upstream_conns(obs)  # the other client's upstream connection
    assert base == 1
    s = socket.create_connection((proxy.host, proxy.port))
    batch = b"".join(encode_resp("GET", "v1k") if i % 2 else encode_resp("INCR", "vanish") for i in range(10_000))
    s.sendall(batch)
    s.close()  # without reading a single reply
    _wait_until(lambda: _upstream_conns(obs) == base, timeout=5, what="the vanished client's upstream to close")
    time.sleep(0.3)
    assert _upstream_conns(obs) == base
    # the proxy keeps serving others, old and new
    assert other.get("v1k") == b"v" * 1024
    assert proxy.client().ping() is True
    _wait_until(lambda: proxy.metric_sum("respmeter_client_connections", by=())[()] == 2,
                what="client gauge to drop")


def test_slow_reader_does_not_grow_proxy_memory(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    MIB = 1024 * 1024
    N = 500  # 500 MiB of replies
    value = b"r" * MIB
    proxy.client().set("big", value)
    rss0 = support.rss_kb(proxy.pid)
    s = socket.create_connection((proxy.host, proxy.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(encode_resp("GET", "big") * N)
    peak = 0
    for _ in range(20):  # do not read for ~3 s
        peak = max(peak, support.rss_kb(proxy.pid))
        time.sleep(0.15)
    # meanwhile another client is served
    assert proxy.client().get("big") == value
    # now read everything: all replies arrive intact
    expected = N * (len(b"$%d\r\n" % MIB) + MIB + 2)
    got = 0
    buf = bytearray(4 * MIB)
    s.settimeout(30)
    head = b""
    while got < expected:
        n = s.recv_into(buf)
        assert n, "connection closed early"
        if len(head) < 16:
            head += bytes(buf[: 16 - len(head)])
        got += n
        if got % (50 * MIB) < n:
            peak = max(peak, support.rss_kb(proxy.pid))
    s.close()
    assert got == expected
    assert head.startswith(b"$1048576\r\nrrrr")
    assert peak < 300 * 1024, f"proxy RSS grew from {rss0} kB to {peak} kB with a slow reader"


# --------------------------------------------------------------------------------------------
# graceful shutdown
# --------------------------------------------------------------------------------------------


def test_sigterm_lets_brpop_in_flight_finish_and_exits_0(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    with RespSocket(proxy.host, proxy.port) as s:
        s.command("BRPOP", "sq", "1")
        _wait_until(lambda: obs.info("clients")["blocked_clients"] == 1, what="BRPOP to block")
        t0 = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        # no new clients once shutting down
        _wait_until(lambda: not support.port_is_open(proxy.host, proxy.port, timeout=0.2),
                    timeout=3, what="listener to close")
        s.sock.settimeout(5)
        assert s.read() is None  # the BRPOP timed out server-side and the nil arrived
        assert time.monotonic() - t0 < 3
        assert s.closed_by_peer(5)
    rc = proxy.wait(timeout=10)
    assert rc == 0, proxy.log_text()[-3000:]
    assert "Traceback" not in proxy.log_text()


def test_sigterm_drain_lets_a_popped_item_be_acked_and_pops_nothing_more(redis_factory, proxy_factory):
    """A worker whose BRPOP returns an item during the drain still gets its ack (MULTI ... EXEC)
    through; its next BRPOP is held, never sent, so no item is taken that it could not ack (the
    proxy used to stop reading at SIGTERM and cut the worker between its pop and its ack)."""
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    with RespSocket(proxy.host, proxy.port) as s:
        s.command("BRPOP", "dq", "3")
        _wait_until(lambda: obs.info("clients")["blocked_clients"] == 1, what="BRPOP to block")
        proxy.send_signal(signal.SIGTERM)
        _wait_until(lambda: not support.port_is_open(proxy.host, proxy.port, timeout=0.2),
                    timeout=3, what="listener to close")
        obs.lpush("dq", "task-1")
        s.sock.settimeout(5)
        assert s.read() == [b"dq", b"task-1"]
        s.command("MULTI")
        s.command("HSET", "unacked", "t1", "task-1")
        s.command("EXEC")
        assert [s.read(), s.read(), s.read()] == [b"OK", b"QUEUED", [1]]
        t = time.monotonic()
        s.command("BRPOP", "dq", "3")
        assert s.closed_by_peer(3)
        assert time.monotonic() - t < 1.0
        obs.lpush("dq", "task-2")
        time.sleep(0.2)
        assert obs.lrange("dq", 0, -1) == [b"task-2"]
        assert obs.hget("unacked", "t1") == b"task-1"
    assert proxy.wait(timeout=10) == 0


def test_client_vanishing_with_blocking_command_in_flight_closes_its_upstream(redis_factory, proxy_factory):
    """Redis frees a blocked client that disconnects; through the proxy the blocked upstream
    connection must go away too (otherwise every such client leaks a connection forever)."""
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    s = socket.create_connection((proxy.host, proxy.port))
    s.sendall(encode_resp("BLPOP", "never", "0"))
    _wait_until(lambda: obs.info("clients")["blocked_clients"] == 1, what="BLPOP to block")
    s.close()
    _wait_until(lambda: _upstream_conns(obs) == 0, timeout=5,
                what="the blocked upstream connection of a vanished client to close")
    _wait_until(lambda: proxy.metric_sum("respmeter_client_connections", by=())[()] == 0,
                what="client gauge to drop")


@pytest.mark.parametrize("count", [b"2147483647", b"2147483648"])
def test_huge_multibulk_count_does_not_stall_the_proxy(redis_server, proxy_factory, count):
    """A client announcing a gigantic array must not block the event loop for everybody."""
    proxy = proxy_factory(redis_server)
    good = proxy.client(socket_timeout=2)
    assert good.ping() is True
    for _ in range(2):
        s = socket.create_connection((proxy.host, proxy.port))
        s.sendall(b"*" + count + b"\r\n")
        time.sleep(0.1)
        s.close()
    time.sleep(0.2)
    # the proxy answers others promptly (a stall of seconds makes these time out)
    for _ in range(5):
        assert good.ping() is True
        proxy.metrics_text(timeout=2)


def test_a_bug_closes_only_that_client_and_is_logged(redis_factory, caplog):
    """An exception inside the proxy while it handles one client (a bug) is logged with its
    traceback and closes that client at once, instead of leaving it waiting for ever; other clients
    are served as before."""
    import asyncio

    from proxy.config import parse_listen, parse_upstream
    from proxy.health import Health
    from proxy.metrics import Stats
    from proxy.server import Proxy, ProxySettings

    server = redis_factory()

    class Buggy:
        slow_names = frozenset({"echo"})

        def init_session(self, session):
            pass

        def fast_admit(self, session, n):
            return True

        def fast_refund(self, session, n):
            pass

        def admit(self, session, args, info, name):
            if args[1:] == [b"boom"]:
                raise RuntimeError("a bug")
            return (0, None, "")

    async def main():
        settings = ProxySettings(parse_upstream(server.url), policy=Buggy())
        port = support.free_port()
        stats = Stats()
        proxy = Proxy(settings, [parse_listen(f"127.0.0.1:{port}")], stats, Health(lambda: None))
        await proxy.start()
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(b"*2\r\n$4\r\nECHO\r\n$2\r\nok\r\n")
            assert await asyncio.wait_for(r2.readline(), 5) == b"$2\r\n"
            await r2.readline()
            w1.write(b"*2\r\n$4\r\nECHO\r\n$4\r\nboom\r\n")
            assert await asyncio.wait_for(r1.read(), 3) == b""  # closed, not left hanging
            # the same as the very first command, looked at once the upstream connection is up
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            w3.write(b"*2\r\n$4\r\nECHO\r\n$4\r\nboom\r\n")
            assert await asyncio.wait_for(r3.read(), 3) == b""
            w2.write(b"*2\r\n$4\r\nECHO\r\n$2\r\nok\r\n")  # the other client goes on
            assert await asyncio.wait_for(r2.readline(), 5) == b"$2\r\n"
            w2.close()
        finally:
            await proxy.shutdown(1.0)

    with caplog.at_level("ERROR", logger="respmeter"):
        asyncio.run(main())
    assert any("internal error handling client" in r.getMessage() and r.exc_info for r in caplog.records)
