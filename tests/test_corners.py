"""Connection corner cases as the server does them (issue 11): QUIT and half-close."""

from __future__ import annotations

import socket
import time

import pytest

import support
from support import encode_resp


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_nothing_after_quit_is_forwarded_or_counted(redis_factory, proxy_factory) -> None:
    """Issue 11.9: in SET q 1; QUIT; SET q 2; INCR qq the server runs only SET and QUIT."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--daily-cap", "1000"], log_level="info")
    direct = server.client()
    before = support.commandstats(direct)
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.sendall(encode_resp("SET", "q", "1") + encode_resp("QUIT") + encode_resp("SET", "q", "2")
                 + encode_resp("INCR", "qq"))
    assert _read_all(sock) == b"+OK\r\n+OK\r\n"  # and then the connection is closed
    assert direct.get("q") == b"1" and direct.get("qq") is None
    # (on the upstream pool, QUIT is answered by the proxy, and the shared connection sent its own
    # handshake, under client respmeter)
    own = {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total", client="respmeter").items() if v}
    delta = support.commandstats_delta(before, support.commandstats(direct))
    assert {k: v - own.get(k, 0) for k, v in delta.items() if v != own.get(k, 0)} == (
        {"set": 1, "get": 2} if support.POOLED else {"set": 1, "quit": 1, "get": 2})
    up = proxy.metric_sum("respmeter_upstream_commands_total")
    assert {k: v - own.get(k, 0) for k, v in up.items() if v != own.get(k, 0)} == (
        {"set": 1.0} if support.POOLED else {"set": 1.0, "quit": 1.0})
    seen = proxy.metric_sum("respmeter_commands_total")
    assert seen == {"set": 1.0, "quit": 1.0}
    # the same split over two writes: what comes after QUIT is never read
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.sendall(encode_resp("QUIT"))
    sock.sendall(encode_resp("INCR", "qq"))
    assert _read_all(sock) == b"+OK\r\n"
    assert direct.get("qq") is None


def _half_closed(server, proxy, *parts: bytes, pause: float = 0.0) -> dict[str, bytes]:  # noqa: ANN001
    """The same writes (``pause`` seconds apart), then shutdown(SHUT_WR), straight to the server and
    through the proxy: all that each sent back before closing."""
    got = {}
    for name, port in (("direct", server.port), ("proxy", proxy.port)):
        sock = socket.create_connection(("127.0.0.1", port))
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        got[name] = _read_all(sock)
        sock.close()
    return got


def test_a_half_closed_client_gets_every_reply(redis_factory, proxy_factory) -> None:
    """Issue 11.10: a pipeline, then shutdown(SHUT_WR): Redis 7 answers all of it; so does the
    proxy, and it counts them as answered."""
    server = redis_factory()
    proxy = proxy_factory(server, [], log_level="info")
    pipeline = b"".join(encode_resp("INCR", "half") for _ in range(20))
    replies = {}
    for name, port in (("direct", server.port), ("proxy", proxy.port)):
        server.client().delete("half")
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(pipeline)
        sock.shutdown(socket.SHUT_WR)
        replies[name] = _read_all(sock)
        sock.close()
    assert replies["direct"] == b"".join(b":%d\r\n" % i for i in range(1, 21))
    assert replies["proxy"] == replies["direct"]
    assert proxy.metric_sum("respmeter_commands_total", by=("command", "outcome")) == {("incr", "ok"): 20.0}
    support.eventually(lambda: proxy.metric_sum("respmeter_client_connections", by=()).get((), 0) == 0)


def test_a_half_closed_blocked_client_is_let_go(redis_factory, proxy_factory) -> None:
    """... but a blocked command is abandoned at the end, as Redis frees a blocked client."""
    server = redis_factory()
    proxy = proxy_factory(server, [], log_level="info")
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.sendall(encode_resp("BLPOP", "never", "0"))
    support.eventually(lambda: server.client().info("clients")["blocked_clients"] == 1)
    sock.shutdown(socket.SHUT_WR)
    assert _read_all(sock) == b""
    support.eventually(lambda: server.client().info("clients")["blocked_clients"] == 0)


BUSY = "local i = 0 while i < 1000000 do i = i + 1 end return 1"  # (some milliseconds of server time)


@pytest.mark.parametrize("pool", [0, 2])
def test_a_blocking_pop_that_did_not_block_delivers_its_item_to_a_half_closed_client(
        redis_factory, proxy_factory, pool) -> None:
    """BLPOP on a list with an item, then shutdown(SHUT_WR) at once: Redis pops the item and writes
    it before it sees the end. Closing the upstream at the client's end would lose the item (popped,
    never delivered: a script that keeps the server busy a moment before makes sure the end
    reaches the proxy first); the proxy passes the end on instead, and the item arrives. On the
    pool the BLPOP still waits for its own connection when the end comes: the end follows it."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--upstream-pool", str(pool)], log_level="info")
    obs = server.client()
    got = {}
    for name, port in (("direct", server.port), ("proxy", proxy.port)):
        for i in range(10):
            obs.rpush("jobs", f"job{i}")
        out = []
        for i in range(10):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(encode_resp("EVAL", BUSY, "0") + encode_resp("BLPOP", "jobs", "0"))
            sock.shutdown(socket.SHUT_WR)
            out.append(_read_all(sock))
            sock.close()
        got[name] = out
        assert obs.llen("jobs") == 0
    assert got["direct"] == [b":1\r\n*2\r\n$4\r\njobs\r\n$4\r\njob%d\r\n" % i for i in range(10)]
    assert got["proxy"] == got["direct"]
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert outcomes.get(("blpop", "ok")) == 10, outcomes
    support.eventually(lambda: proxy.metric_sum("respmeter_client_connections", by=()).get((), 0) == 0)


@pytest.mark.parametrize("pool", [0, 2])
def test_a_blocking_pop_that_blocked_at_the_end_takes_nothing(redis_factory, proxy_factory, pool) -> None:
    """BLPOP on an empty list, then the end: Redis drops the blocked command, and an item pushed
    later stays in the list. Through the proxy too, and the client is let go at once (a BLPOP
    left blocked upstream would take the next item for a client that is gone)."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--upstream-pool", str(pool)], log_level="info")
    obs = server.client()
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.sendall(encode_resp("GET", "k") + encode_resp("BLPOP", "empty", "0"))
    sock.shutdown(socket.SHUT_WR)
    t0 = time.monotonic()
    assert _read_all(sock) == b"$-1\r\n"
    assert time.monotonic() - t0 < 3
    sock.close()
    support.eventually(lambda: obs.info("clients")["blocked_clients"] == 0)
    obs.rpush("empty", "item")
    time.sleep(0.2)
    assert obs.lrange("empty", 0, -1) == [b"item"]
    support.eventually(lambda: proxy.metric_sum("respmeter_client_connections", by=()).get((), 0) == 0)


def _exhaust(proxy, cap: int) -> None:  # noqa: ANN001
    import redis

    c = proxy.client()
    for _ in range(cap + 5):
        try:
            c.incr("corners:fill")
        except redis.ResponseError as exc:
            assert "cap" in str(exc)
            return
    raise AssertionError("the cap was never reached")


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_client_can_connect_at_an_exhausted_cap(protocol: int, redis_factory, proxy_factory) -> None:
    """Issue 11.11: at the cap, the handshake (HELLO with a connection id of the proxy's own,
    CLIENT SETINFO, CLIENT SETNAME, SELECT 0) is answered by the proxy; only real commands get the
    cap error, and nothing goes upstream."""
    import redis

    server = redis_factory()
    proxy = proxy_factory(server, ["--daily-cap", "30"], log_level="info")
    warm = proxy.client(protocol=protocol)  # a real HELLO reply, remembered by the proxy
    warm.ping()
    _exhaust(proxy, 30)
    direct = server.client()
    before = support.commandstats(direct)
    clients = []
    for _ in range(2):
        c = proxy.client(protocol=protocol, client_name="late", db=0)
        clients.append(c)
        # connecting works: redis-py's whole handshake is answered
        c.connection_pool.get_connection().disconnect()
        with pytest.raises(redis.ResponseError, match="cap"):
            c.get("corners:x")
    conn = clients[0].connection_pool.get_connection()
    conn.connect()
    delta = support.commandstats_delta(before, support.commandstats(direct))
    assert set(delta) <= {"info"}, delta  # (the test's own INFO reads only)
    local = proxy.metric_sum("respmeter_commands_total", by=("command",), outcome="local")
    assert local.get("client|setname", 0) >= 2 and local.get("client|setinfo", 0) >= 4
    if protocol == 3:
        assert local.get("hello", 0) >= 2
    # each connection got an id of its own, not the server's
    s = support.RespSocket(proxy.host, proxy.port)
    ids = {s.call("HELLO", str(protocol))[b"id" if protocol == 3 else 7] for _ in range(1)}
    s2 = support.RespSocket(proxy.host, proxy.port)
    hello2 = s2.call("HELLO", str(protocol))
    ids.add(hello2[b"id"] if protocol == 3 else hello2[7])
    assert len(ids) == 2 and all(i >= 1 << 32 for i in ids)
    assert s.call("SELECT", "0") == b"OK" and isinstance(s.call("SELECT", "1"), support.RespError)


@pytest.mark.slow
def test_a_celery_worker_started_at_an_exhausted_cap_waits_quietly(redis_factory, proxy_factory, tmp_path) -> None:
    """Issue 11.11: under on_cap = idle, a worker started after the cap is used up connects (its
    handshake is answered by the proxy) and then waits at its first real command for the window
    to reset: it stays alive, idle, and the server sees nothing; SIGTERM still stops it."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--daily-cap", "40", "--on-cap", "idle"], log_level="info")
    proxy.client().ping()  # a HELLO reply to remember
    _exhaust(proxy, 40)
    direct = server.client()
    before = support.commandstats(direct)
    worker = support.CeleryWorker(f"{proxy.url}/0", tmp_path / "late", stop_timeout=5)
    try:
        worker.start()
        time.sleep(6)
        assert worker.is_running(), worker.log_text()[-3000:]
        assert "Unrecoverable error" not in worker.log_text() and "Traceback" not in worker.log_text()
        cpu = worker.cpu_seconds()
        time.sleep(3)
        assert worker.cpu_seconds() - cpu < 0.3  # waiting, not spinning
        local = proxy.metric_sum("respmeter_commands_total", by=("command",), outcome="local")
        assert local.get("hello", 0) >= 1  # it connected
        t0 = time.monotonic()
    finally:
        worker.stop()
    assert time.monotonic() - t0 < 8
    delta = support.commandstats_delta(before, support.commandstats(direct))
    assert set(delta) <= {"info"}, delta  # nothing billed (the test's own INFO reads only)


def test_client_reply_queued_in_a_transaction_acts_only_when_it_runs(redis_factory, proxy_factory) -> None:
    """CLIENT REPLY OFF inside MULTI is only queued (+QUEUED): DISCARD leaves replies on. The proxy
    once took it to act at once, and every reply after it was one command late."""
    server = redis_factory()
    proxy = proxy_factory(server, [])
    script = b"".join(encode_resp(*c) for c in [
        ("MULTI",), ("CLIENT", "REPLY", "OFF"), ("SET", "k", "v"), ("DISCARD",), ("PING", "a"),
        ("CLIENT", "REPLY", "OFF"), ("PING", "b"), ("CLIENT", "REPLY", "ON"), ("GET", "k"),
    ])
    got = _half_closed(server, proxy, script)
    assert got["direct"] == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n$1\r\na\r\n+OK\r\n$-1\r\n"
    assert got["proxy"] == got["direct"]


def test_rate_limit_refusals_under_client_reply_off_are_silent(redis_factory, proxy_factory) -> None:
    """CLIENT REPLY OFF: no reply at all, the proxy's refusals included (here a rate limit's full
    queue); the client reads only what follows CLIENT REPLY ON, as from Redis."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--rate-limit", "name=r,rate=2/s,burst=1,command=get,action=delay,max_queue=1"])
    first = b"".join(encode_resp(*c) for c in [("CLIENT", "REPLY", "OFF"), *[("GET", f"k{i}") for i in range(3)]])
    then = encode_resp("CLIENT", "REPLY", "ON") + encode_resp("PING")
    got = _half_closed(server, proxy, first, then, pause=1.5)  # (the held GET has gone by then)
    assert got["direct"] == b"+OK\r\n+PONG\r\n"
    assert got["proxy"] == got["direct"]
    rejected = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome")).get(("get", "rejected"))
    assert rejected == 1, rejected  # (counted all the same)


def test_a_half_closed_pipeline_of_blpop_then_subscribe_gets_both(redis_factory, proxy_factory) -> None:
    """BLPOP on a list with an item, SUBSCRIBE, then the end: Redis sends the item and the
    confirmation, then closes. The proxy used to close at once on seeing a subscription in flight,
    and the popped item was lost about half the time."""
    server = redis_factory()
    proxy = proxy_factory(server, [])
    obs = server.client()
    script = encode_resp("BLPOP", "q", "0") + encode_resp("SUBSCRIBE", "ch")
    expected = b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    for _ in range(10):
        obs.rpush("q", "x")
        obs.rpush("q", "x")
        got = _half_closed(server, proxy, script)
        assert got["direct"] == expected
        assert got["proxy"] == expected
        assert obs.llen("q") == 0


def test_a_monitor_client_s_maint_notifications_on_goes_as_off(redis_factory, proxy_factory) -> None:
    """In MONITOR mode bytes pass through, CLIENT MAINT_NOTIFICATIONS ON rewritten among them (as
    OFF, like everywhere): Redis 7's own error comes back and the connection stays open."""
    server = redis_factory()
    proxy = proxy_factory(server, [])
    for port in (server.port, proxy.port):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        sock.sendall(encode_resp("MONITOR"))
        assert sock.recv(100) == b"+OK\r\n"
        sock.sendall(encode_resp("CLIENT", "MAINT_NOTIFICATIONS", "ON", "moving-endpoint-type", "none")
                     + encode_resp("PING"))
        data = b""
        while b"+PONG\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data  # (not closed)
            data += chunk
        assert data.startswith(b"-ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP.\r\n"), data
        sock.close()
