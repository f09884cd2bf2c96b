"""The poll saver (proxy.pollhold) against a real redis-server: a client's short blocking pops are
answered by the proxy while one long pop is held upstream. Each test checks what the client sees
against what the server would have given it, and what the server executed (its own counts)."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import RespSocket, commandstats, commandstats_delta

SAVERS = ["--savers", "poll", "--saver-hold", "30"]


def _upstream(proxy) -> dict[str, int]:
    return {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}


def _local(proxy, command: str) -> int:
    return int(proxy.metric_sum("respmeter_commands_total", by=("outcome",), command=command).get("local", 0))


@pytest.fixture
def env(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, SAVERS)
    obs = server.client()
    known = support.server_known_commands(obs)
    _warm(proxy, obs)
    return server, proxy, obs, known


def _sock(proxy, protocol: int = 2) -> RespSocket:
    s = RespSocket(proxy.host, proxy.port)
    if protocol == 3:
        assert isinstance(s.call("HELLO", "3"), dict)
    return s


def _warm(proxy, obs) -> None:
    """The proxy's first pop goes upstream as it is while it checks its control connection may
    CLIENT UNBLOCK: make that happen before a test counts anything."""
    w = _sock(proxy)
    assert w.call("BRPOP", "warm-up", "0.05") is None
    assert support.eventually(lambda: w.call("BRPOP", "warm-up", "0.01") is None and _held(proxy), timeout=5)
    w.sock.close()
    assert support.eventually(lambda: int(obs.info("clients")["blocked_clients"]) == 0, timeout=5)
    # left: this observer and the proxy's control connection
    assert support.eventually(lambda: int(obs.info("clients")["connected_clients"]) == 2, timeout=5)


def _held(proxy) -> bool:
    return _upstream(proxy).get("client|id", 0) > 0


def _raw_reply(sock: RespSocket, *args) -> bytes:
    """The exact bytes of one reply (for short replies that arrive in one read)."""
    sock.command(*args)
    sock.sock.settimeout(10)
    data = sock.sock.recv(65536)
    return data


def test_short_timeouts_answered_locally_one_pop_upstream(env):
    server, proxy, obs, known = env
    first = commandstats(obs)
    up0 = _upstream(proxy)
    local0 = _local(proxy, "brpop")
    s = _sock(proxy)
    s.call("PING")  # the connection is up (and the proxy has seen a reply)
    before = commandstats(obs)
    t0 = time.monotonic()
    times = []
    for _ in range(8):
        t = time.monotonic()
        assert s.call("BRPOP", "q1", "q2", "0.2") is None
        times.append(time.monotonic() - t)
    assert min(times) >= 0.19, times  # the client's own timeout, not earlier
    assert max(times) < 0.6, times
    delta = commandstats_delta(before, commandstats(obs))
    # one held pop and the proxy's CLIENT ID, not eight pops
    assert delta.get("brpop") == 1 and delta.get("client|id") == 1, delta
    assert time.monotonic() - t0 < 5
    assert _local(proxy, "brpop") - local0 == 8
    saved = proxy.metric_sum("respmeter_saved_commands_total", by=("saver",))
    assert saved.get("poll") == 8 + local0
    s.call("GET", "x")  # cancels the hold (CLIENT UNBLOCK): the server counts what the proxy counts
    delta = commandstats_delta(first, commandstats(obs))
    delta.pop("info", None)  # (the reads in between)
    assert delta.get("client|unblock") == 1, delta
    support.assert_counts_match(_minus(_upstream(proxy), up0), delta, known)


def _minus(a: dict, b: dict) -> dict:
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


def test_item_delivered_at_once_and_counts_match(env):
    server, proxy, obs, known = env
    before = commandstats(obs)
    up0 = _upstream(proxy)
    s = _sock(proxy)
    assert s.call("BRPOP", "q", "0.1") is None  # the hold starts
    threading.Timer(0.3, lambda: obs.lpush("q", "item-1")).start()
    t = time.monotonic()
    assert s.call("BRPOP", "q", "5") == [b"q", b"item-1"]
    took = time.monotonic() - t
    assert 0.25 < took < 0.8, took
    assert obs.llen("q") == 0
    assert s.call("GET", "k") is None
    s.sock.close()
    time.sleep(0.3)
    delta = commandstats_delta(before, commandstats(obs))
    delta["lpush"] -= 1  # (sent directly)
    delta.pop("llen")
    delta.pop("hello", None)  # (the timer thread's own connection to the server)
    support.assert_counts_match(_minus(_upstream(proxy), up0), delta, known)


@pytest.mark.parametrize("protocol", [2, 3])
def test_nil_and_item_bytes_equal_the_servers(env, protocol):
    """What the client reads, byte for byte, is what the server sends for the same commands."""
    server, proxy, obs, known = env
    direct = RespSocket(server.host, server.port)
    via = _sock(proxy)
    if protocol == 3:
        direct.call("HELLO", "3")
        via.call("HELLO", "3")
    for sock in (direct, via):
        assert _raw_reply(sock, "BRPOP", "pq", "0.1") == (b"*-1\r\n" if protocol == 2 else b"_\r\n")
    obs.rpush("pq2", "a")
    obs.rpush("pq", "a")  # (the proxy's hold on pq takes it at once)
    got = [_raw_reply(direct, "BRPOP", "pq2", "1"), _raw_reply(via, "BRPOP", "pq", "1")]
    assert got[0] == b"*2\r\n$3\r\npq2\r\n$1\r\na\r\n"
    assert got[1] == b"*2\r\n$2\r\npq\r\n$1\r\na\r\n"
    # a bad timeout is the server's to judge: the same error
    errs = [_raw_reply(sock, "BRPOP", "pq", "soon") for sock in (direct, via)]
    assert errs[0] == errs[1] and errs[0].startswith(b"-ERR")


def test_command_after_a_parked_pop_waits_for_it_as_on_redis(env):
    server, proxy, obs, known = env
    s = _sock(proxy)
    s.call("SET", "k", "v")
    t = time.monotonic()
    s.send(support.encode_resp("BRPOP", "q", "0.4") + support.encode_resp("GET", "k"))
    assert s.read() is None
    assert s.read() == b"v"
    assert time.monotonic() - t >= 0.39


def test_hold_cancelled_by_another_command(env):
    """After the client stops polling, the held pop is let go: an item pushed later stays in the
    list for other consumers, and the other command is not held up."""
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call("BRPOP", "cq", "0.1") is None
    before = commandstats(obs)
    t = time.monotonic()
    assert s.call("SET", "x", "1") == b"OK"
    assert time.monotonic() - t < 0.5
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("client|unblock") == 1, delta
    obs.rpush("cq", "stay")
    time.sleep(0.5)
    assert obs.lrange("cq", 0, -1) == [b"stay"]


def test_pop_on_other_keys_restarts_the_hold(env):
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call("BRPOP", "k1", "0.1") is None
    assert s.call("BRPOP", "k1", "k2", "0.1") is None  # add_consumer: the keys change
    threading.Timer(0.2, lambda: obs.lpush("k2", "new-queue-item")).start()
    t = time.monotonic()
    assert s.call("BRPOP", "k1", "k2", "3") == [b"k2", b"new-queue-item"]
    assert time.monotonic() - t < 0.6


@pytest.mark.parametrize("pop,push", [("BRPOP", "RPUSH"), ("BLPOP", "LPUSH")])
def test_item_no_client_takes_goes_back_in_order_within_a_second(env, pop, push):
    """The client stops polling just as an item arrives: the item is back in the list, at the end it
    came from, within a second (the only window a kill -9 could lose it in)."""
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call(pop, "oq", "0.1") is None  # hold running, nothing parked now
    getattr(obs, push.lower())("oq", "x1")
    t = time.monotonic()
    # the hold took it: the list is empty until it goes back
    time.sleep(0.05)
    assert obs.llen("oq") == 0
    while obs.llen("oq") == 0:
        assert time.monotonic() - t < 2.0, "item not pushed back"
        time.sleep(0.02)
    window = time.monotonic() - t
    assert window <= 1.3, window
    held = proxy.metric_sum("respmeter_saver_item_held_seconds_max", by=())[()]
    assert 0.9 <= held <= 1.1, held  # the proxy's own measure of the kill -9 window
    obs.rpush("oq", "x2")
    expect = [b"x1", b"x2"]
    assert obs.lrange("oq", 0, -1) == expect
    # and the client's next pop would have had it: nothing is duplicated
    assert s.call("GET", "nothing") is None
    assert obs.lrange("oq", 0, -1) == expect


def test_kept_item_goes_to_the_next_pop(env):
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call("BRPOP", "nq", "0.1") is None
    obs.lpush("nq", "soon")
    time.sleep(0.2)  # the hold has it, the client has not asked yet
    assert s.call("BRPOP", "nq", "1") == [b"nq", b"soon"]
    time.sleep(1.2)
    assert obs.llen("nq") == 0  # delivered once, not pushed back too


def test_client_gone_with_item_in_flight_pushes_it_back(env):
    server, proxy, obs, known = env
    conns = _conns(obs)
    s = _sock(proxy)
    assert s.call("BRPOP", "gq", "0.1") is None
    obs.lpush("gq", "orphan")
    time.sleep(0.05)
    s.sock.close()  # the client goes while the proxy holds its item
    deadline = time.monotonic() + 2
    while obs.llen("gq") == 0:
        assert time.monotonic() < deadline, "item lost"
        time.sleep(0.02)
    assert obs.lrange("gq", 0, -1) == [b"orphan"]
    # and the upstream connection is closed once that is done
    assert support.eventually(lambda: _conns(obs) == conns, timeout=2), (_conns(obs), conns, obs.client_list())


def _conns(obs) -> int:
    return int(obs.info("clients")["connected_clients"])


def test_client_gone_while_hold_blocks_leaves_nothing_behind(env):
    server, proxy, obs, known = env
    conns = _conns(obs)
    s = _sock(proxy)
    assert s.call("BRPOP", "lq", "0.1") is None
    s.sock.close()
    assert support.eventually(lambda: int(obs.info("clients")["blocked_clients"]) == 0, timeout=1.0)
    # and its upstream connection is gone too
    assert support.eventually(lambda: _conns(obs) == conns, timeout=2), (_conns(obs), conns, obs.client_list())
    obs.lpush("lq", "later")
    time.sleep(1.3)  # (longer than an item is ever kept)
    assert obs.lrange("lq", 0, -1) == [b"later"]


def test_two_clients_same_keys_every_item_exactly_once(env):
    server, proxy, obs, known = env
    got: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def consumer() -> None:
        s = _sock(proxy)
        while not stop.is_set():
            r = s.call("BRPOP", "shared", "0.2")
            if r is not None:
                with lock:
                    got.append(r[1])
        s.sock.close()

    threads = [threading.Thread(target=consumer) for _ in range(2)]
    for th in threads:
        th.start()
    rng = random.Random(7)
    items = [b"i%03d" % i for i in range(150)]
    for i in range(0, len(items), 5):
        obs.lpush("shared", *items[i : i + 5])
        time.sleep(rng.uniform(0, 0.05))
    deadline = time.monotonic() + 10
    while len(got) < len(items) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join(5)
    time.sleep(1.3)  # anything kept goes back within a second
    left = obs.lrange("shared", 0, -1)
    assert sorted(got + left) == sorted(items), (len(got), len(left))
    assert len(set(got)) == len(got)


def test_in_multi_and_resp3_subscribed_pops_are_forwarded(env):
    server, proxy, obs, known = env
    s = _sock(proxy)
    s.call("MULTI")
    assert s.call("BRPOP", "mq", "1") == b"QUEUED"
    assert s.call("EXEC") == [None]


def test_graceful_shutdown_pushes_back_what_is_held(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, SAVERS)
    obs = server.client()
    _warm(proxy, obs)
    s = _sock(proxy)
    assert s.call("BRPOP", "sq", "0.1") is None
    obs.lpush("sq", "held")
    time.sleep(0.05)
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(10)
    assert obs.lrange("sq", 0, -1) == [b"held"]
    assert int(obs.info("clients")["blocked_clients"]) == 0


def test_block_forever_gets_a_late_item(env):
    server, proxy, obs, known = env
    s = _sock(proxy)
    threading.Timer(1.2, lambda: obs.rpush("fq", "late")).start()
    assert s.call("BRPOP", "fq", "0") == [b"fq", b"late"]


def test_parked_pop_at_client_eof_is_let_go(env):
    """A client that half-closes with a parked pop is closed, as Redis frees a blocked client."""
    server, proxy, obs, known = env
    s = _sock(proxy)
    s.command("BRPOP", "eq", "5")
    time.sleep(0.1)
    s.sock.shutdown(socket.SHUT_WR)
    s.sock.settimeout(3)
    t = time.monotonic()
    assert s.sock.recv(100) == b""
    assert time.monotonic() - t < 1.5
    obs.lpush("eq", "kept")
    time.sleep(0.3)
    assert obs.lrange("eq", 0, -1) == [b"kept"]




def test_large_item_for_a_waiting_pop_is_relayed_not_held(env):
    """A 64 MB item the hold brings to a parked pop goes to the client as it arrives: the proxy's
    memory does not grow by the item's size."""
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call("BRPOP", "big", "0.05") is None
    time.sleep(0.1)
    rss0 = support.rss_kb(proxy.pid)
    value = b"v" * (64 * 1024 * 1024)
    threading.Timer(0.3, lambda: obs.lpush("big", value)).start()
    s.command("BRPOP", "big", "10")
    # read slowly at first: the proxy must not hold what the client has not read yet
    peak = rss0
    got = b""
    s.sock.settimeout(10)
    head = b"*2\r\n$3\r\nbig\r\n$67108864\r\n"
    while len(got) < len(head) + len(value) + 2:
        chunk = s.sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
        if len(got) < 8 * 1024 * 1024:
            time.sleep(0.002)
        peak = max(peak, support.rss_kb(proxy.pid))
    assert got.startswith(head) and got.endswith(b"v\r\n")
    assert len(got) == len(head) + len(value) + 2
    growth_mb = (peak - rss0) / 1024
    assert growth_mb < 32, growth_mb  # (held whole it would be 64 MB, plus copies)


def test_holds_are_charged_to_the_cap_and_never_overshoot_it(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, [*SAVERS, "--daily-cap", "30"])
    obs = server.client()
    _warm(proxy, obs)
    before = commandstats(obs)
    left = 30 - int(proxy.metric_sum("respmeter_quota_used", by=("window",), client="all").get("daily", 0))
    s = _sock(proxy)
    refused = 0
    for i in range(40):
        r = s.call("BRPOP", "capq", "0.02") if i % 4 else s.call("GET", "k")
        if isinstance(r, support.RespError):
            assert "cap of 30" in r
            refused += 1
    s.sock.close()
    time.sleep(0.5)
    delta = commandstats_delta(before, commandstats(obs))
    delta.pop("info", None)
    executed = sum(delta.values())
    assert executed <= left, (delta, left)
    assert refused > 0
    used = proxy.metric_sum("respmeter_quota_used", by=("window",), client="all")
    assert used.get("daily", 0) <= 30


def test_large_item_nobody_waits_for_goes_back_as_it_arrives(env):
    """A client starts a hold, then does not ask again while a 64 MB item arrives (what a hostile
    client would do to make the proxy keep it): the item goes back to its list as it arrives, so
    the proxy's memory does not grow by its size, and the client's next pop gets it whole."""
    server, proxy, obs, known = env
    s = _sock(proxy)
    assert s.call("BRPOP", "bigq", "0.05") is None  # hold running, the client not waiting
    time.sleep(0.1)
    rss0 = support.rss_kb(proxy.pid)
    value = b"w" * (64 * 1024 * 1024)
    obs.lpush("bigq", value)
    peak = rss0
    deadline = time.monotonic() + 10
    while obs.llen("bigq") == 0:
        peak = max(peak, support.rss_kb(proxy.pid))
        assert time.monotonic() < deadline, "item not back"
        time.sleep(0.01)
    peak = max(peak, support.rss_kb(proxy.pid))
    assert (peak - rss0) / 1024 < 32, (peak - rss0) / 1024
    assert obs.llen("bigq") == 1
    s.sock.settimeout(10)
    got = s.call("BRPOP", "bigq", "5")
    assert got[0] == b"bigq" and got[1] == value
    assert obs.llen("bigq") == 0
