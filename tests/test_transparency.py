"""The proxy is transparent: real clients get exactly what a direct connection gives them, and the
billable count (``respmeter_upstream_commands_total`` by command) equals the server's own
``INFO commandstats`` (calls + rejected_calls) exactly.

Every test runs against a FRESH redis-server (``redis_factory``) and its own proxy, checks the
functional result, and then compares the counts with :func:`assert_upstream_matches_commandstats`.

Scripts used here never call ``redis.call``: commands run by a script are counted by the server
but never cross the proxy, so no proxy could count them.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis


from support import (
    POOLED,
    RespError,
    RespPush,
    RespSocket,
    assert_counts_match,
    commandstats,
    commandstats_delta,
    encode_resp,
    server_known_commands,
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class Env:
    """A fresh server, a proxy in front of it and a direct observer connection."""

    def __init__(self, server, proxy):
        self.server = server
        self.proxy = proxy
        self.observer = server.client()
        # connects (handshake) before the baseline; COMMAND LIST is not in the compared window
        self.known = server_known_commands(self.observer)
        self.before = commandstats(self.observer)
        self.direct_counts: dict[str, int] = {}

    def direct(self, command: str, *args):
        """Run a command DIRECTLY on the server (to check what it holds); excluded from the comparison."""
        self.direct_counts[command] = self.direct_counts.get(command, 0) + 1
        return getattr(self.observer, command)(*args)

    def raw(self) -> RespSocket:
        return RespSocket(self.proxy.host, self.proxy.port)

    def server_delta(self) -> dict[str, int]:
        delta = commandstats_delta(self.before, commandstats(self.observer))
        for cmd, n in self.direct_counts.items():
            delta[cmd] -= n
            if not delta[cmd]:
                del delta[cmd]
        return delta

    def assert_counts_exact(self) -> dict[str, int]:
        return assert_upstream_matches_commandstats(self.proxy, self.server_delta(), self.known)


def assert_upstream_matches_commandstats(proxy, delta: dict[str, int], known) -> dict[str, int]:
    """``respmeter_upstream_commands_total`` by command == the server's commandstats delta.

    Compared for every command the server knows (``known``, :func:`server_known_commands`). The only
    names left out are those it does not know: the ``unknown`` label and e.g. ``client|setinfo``
    (redis-py 5+ sends ``CLIENT SETINFO``, which the proxy's table names but Redis 7.0 rejects as
    an unknown subcommand and does not list in commandstats at all). Returns the proxy's counts.
    """
    up = {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}
    assert_counts_match(up, delta, known)
    return up


@pytest.fixture
def env(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    return Env(server, proxy)


def _tricky_bytes(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(n))
    # sprinkle protocol-looking sequences all over the value
    for token in (b"\r\n", b"\x00", b"*3\r\n$3\r\nSET\r\n", b"$-1\r\n", b"-ERR x\r\n", b"+OK\r\n"):
        for _ in range(200):
            i = rnd.randrange(0, n - len(token))
            data[i : i + len(token)] = token
    data[:6] = b"$5\r\n\x00\r"  # starts like a bulk header
    data[-2:] = b"\r\n"  # ends like a line
    return bytes(data)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_5mib_binary_value_roundtrip(env):
    c = env.proxy.client()
    key = b"bin\r\nkey\x00\xff*1\r\n"
    value = _tricky_bytes(5 * 1024 * 1024, seed=1)
    assert c.set(key, value) is True
    got = c.get(key)
    assert got is not None and len(got) == len(value)
    assert got == value
    assert c.strlen(key) == len(value)
    assert c.getrange(key, 1000, 1999) == value[1000:2000]
    # the server stored exactly those bytes under exactly that key
    assert env.direct("get", key) == value
    # a second, different 5 MiB value on a RESP3 connection (different reply framing path)
    c3 = env.proxy.client(protocol=3)
    value2 = _tricky_bytes(5 * 1024 * 1024, seed=2)
    assert c3.set(key + b"\x00two", value2) is True
    assert c3.get(key + b"\x00two") == value2
    assert c.get(b"bin\r\nkey\x00\xff") is None  # a prefix of the key is a different key
    up = env.assert_counts_exact()
    assert up["set"] == 2 and up["get"] == 3


def test_500_command_pipeline_order_and_results(env):
    c = env.proxy.client()
    c.rpush("plist", "x")
    p = c.pipeline(transaction=False)
    expected = []
    counter = 0
    for i in range(500):
        r = i % 5
        if r == 0:
            p.set(f"pk{i}", f"v{i}")
            expected.append(True)
        elif r == 1:
            p.get(f"pk{i - 1}")
            expected.append(f"v{i - 1}".encode())
        elif r == 2:
            p.incr("pcounter")
            counter += 1
            expected.append(counter)
        elif r == 3:
            p.get("plist")  # WRONGTYPE, in the middle of the pipeline
            expected.append("WRONGTYPE")
        else:
            p.echo(f"e{i}\r\n\x00")
            expected.append(f"e{i}\r\n\x00".encode())
    results = p.execute(raise_on_error=False)
    assert len(results) == 500
    for i, (want, got) in enumerate(zip(expected, results)):
        if want == "WRONGTYPE":
            assert isinstance(got, redis.ResponseError) and "WRONGTYPE" in str(got), (i, got)
        else:
            assert got == want, (i, got, want)
    # outcomes follow the replies
    ok = env.proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert ok[("get", "error")] == 100
    assert ok[("get", "ok")] == 100
    assert ok[("incrby", "ok")] == 100  # redis-py 8 sends INCR as INCRBY k 1
    env.assert_counts_exact()


def test_multi_exec_discard_and_watch_abort(env):
    proxy = env.proxy
    c = proxy.client()
    # a plain transaction through redis-py
    p = c.pipeline(transaction=True)
    p.set("tx", "1").incr("tx").get("tx")
    assert p.execute() == [True, 2, b"2"]

    other = proxy.client()
    with env.raw() as s:
        # DISCARD: queued commands never run
        assert s.call("MULTI") == b"OK"
        assert s.call("SET", "discarded", "1") == b"QUEUED"
        assert s.call("INCR", "discarded2") == b"QUEUED"
        assert s.call("DISCARD") == b"OK"
        assert env.direct("exists", "discarded", "discarded2") == 0

        # WATCH-aborted EXEC returns a nil array and runs nothing
        assert s.call("WATCH", "w") == b"OK"
        other.set("w", "changed")
        assert s.call("MULTI") == b"OK"
        assert s.call("SET", "w", "mine") == b"QUEUED"
        assert s.call("INCR", "w-side") == b"QUEUED"
        assert s.call("EXEC") is None
        assert env.direct("get", "w") == b"changed"
        assert env.direct("exists", "w-side") == 0

        # a runtime error inside EXEC
        c.set("str", "v")
        assert s.call("MULTI") == b"OK"
        assert s.call("INCR", "n") == b"QUEUED"
        assert s.call("LPUSH", "str", "x") == b"QUEUED"
        res = s.call("EXEC")
        assert res[0] == 1 and isinstance(res[1], RespError) and res[1].startswith("WRONGTYPE")

        # a command rejected while queueing makes EXEC fail with EXECABORT
        assert s.call("MULTI") == b"OK"
        r = s.call("GET")
        assert isinstance(r, RespError) and "wrong number of arguments" in r
        assert s.call("INCR", "n") == b"QUEUED"
        r = s.call("EXEC")
        assert isinstance(r, RespError) and r.startswith("EXECABORT")
        assert env.direct("get", "n") == b"1"

        # the same, pipelined in one write (the proxy sees the whole transaction at once)
        s.send(encode_resp("MULTI") + encode_resp("INCR", "n") + encode_resp("GET", "n")
               + encode_resp("EXEC") + encode_resp("MULTI") + encode_resp("INCR", "n")
               + encode_resp("DISCARD") + encode_resp("GET", "n"))
        assert [s.read() for _ in range(8)] == [
            b"OK", b"QUEUED", b"QUEUED", [2, b"2"], b"OK", b"QUEUED", b"OK", b"2"]

        # the connection is usable afterwards
        assert s.call("GET", "tx") == b"2"
    up = env.assert_counts_exact()
    assert up["multi"] == 7 and up["exec"] == 5 and up["discard"] == 2
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert outcomes[("exec", "error")] == 1  # EXECABORT


def test_brpop_returns_and_times_out(env):
    proxy = env.proxy
    c = proxy.client()
    c.rpush("q1", "ready")
    assert c.brpop("q1", timeout=1) == (b"q1", b"ready")

    # blocked first, then served by another client's push
    result = {}

    def blocked():
        result["v"] = proxy.client().brpop(["q2", "q3"], timeout=5)

    t = threading.Thread(target=blocked)
    t.start()
    deadline = time.monotonic() + 5
    while env.direct("info", "clients")["blocked_clients"] < 1:
        assert time.monotonic() < deadline, "BRPOP never blocked on the server"
        time.sleep(0.02)
    c.lpush("q3", "late")
    t.join(10)
    assert result["v"] == (b"q3", b"late")

    # times out: nil
    t0 = time.monotonic()
    assert c.brpop("empty-q", timeout=1) is None
    assert time.monotonic() - t0 >= 0.9
    # connection still in sync after the timeout
    assert c.echo("after") == b"after"
    up = env.assert_counts_exact()
    assert up["brpop"] == 3


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub(env, protocol):
    proxy = env.proxy
    sub = proxy.client(protocol=protocol)
    pub = proxy.client()
    p = sub.pubsub()

    def next_msg(timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = p.get_message(timeout=0.2)
            if m is not None:
                return m
        raise AssertionError("no pub/sub message")

    p.subscribe("news", "sport")
    assert next_msg()["type"] == "subscribe"
    assert next_msg()["type"] == "subscribe"
    p.psubscribe("ev.*")
    m = next_msg()
    assert m["type"] == "psubscribe" and m["data"] == 3

    assert pub.publish("news", b"hello\r\n\x00") == 1
    m = next_msg()
    assert (m["type"], m["channel"], m["data"]) == ("message", b"news", b"hello\r\n\x00")
    assert pub.publish("ev.login", "alice") == 1
    m = next_msg()
    assert (m["type"], m["pattern"], m["channel"], m["data"]) == ("pmessage", b"ev.*", b"ev.login", b"alice")

    p.ping("while-subscribed")
    m = next_msg()
    assert m["type"] == "pong" or m["data"] in (b"while-subscribed", [b"pong", b"while-subscribed"])

    p.unsubscribe()  # all channels
    kinds = sorted((next_msg()["type"]) for _ in range(2))
    assert kinds == ["unsubscribe", "unsubscribe"]
    p.punsubscribe()
    m = next_msg()
    assert m["type"] == "punsubscribe" and m["data"] == 0
    assert pub.publish("news", "nobody") == 0
    p.close()

    # the proxy saw exactly the two messages as out-of-band frames
    assert env.proxy.metric_sum("respmeter_push_messages_total", by=())[()] == 2
    up = env.assert_counts_exact()
    assert up["subscribe"] == 1 and up["psubscribe"] == 1 and up["unsubscribe"] == 1
    assert up["punsubscribe"] == 1 and up["publish"] == 3 and up["ping"] == 1


def test_eval_evalsha_script_load(env):
    c = env.proxy.client()
    script = "return {KEYS[1], ARGV[1], #ARGV}"
    assert c.eval(script, 1, "ek", "a\r\n1") == [b"ek", b"a\r\n1", 1]
    sha = c.script_load(script)
    assert isinstance(sha, str) and len(sha) == 40
    assert c.evalsha(sha, 1, "k2", "x", "y") == [b"k2", b"x", 2]
    assert c.script_exists(sha, "0" * 40) == [True, False]
    with pytest.raises(redis.exceptions.NoScriptError):
        c.evalsha("0" * 40, 0)
    with pytest.raises(redis.ResponseError):
        c.eval("return redis.error_reply('boom')", 0)
    up = env.assert_counts_exact()
    assert up["eval"] == 2 and up["evalsha"] == 2 and up["script|load"] == 1
    outcomes = env.proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert outcomes[("evalsha", "error")] == 1 and outcomes[("evalsha", "ok")] == 1
    assert outcomes[("eval", "error")] == 1 and outcomes[("eval", "ok")] == 1


def test_inline_commands_raw_socket(env):
    with env.raw() as s:
        s.send(b"PING\r\n")
        assert s.read() == b"PONG"
        s.send(b'SET ik "a b"\r\n')
        assert s.read() == b"OK"
        s.send(b"GET ik\r\n")
        assert s.read() == b"a b"
        # inline and RESP mixed in one write, C escapes and single quotes, LF-only line end
        s.send(b"SET ik2 \"x\\x41\\n\"\r\n" + encode_resp("GET", "ik2") + b"ECHO 'it\\'s'\n" + b"\r\n" + b"PING\r\n")
        assert s.read() == b"OK"
        assert s.read() == b"xA\n"
        assert s.read() == b"it's"
        assert s.read() == b"PONG"
        s.send(b"NOSUCHCMD a b\r\n")
        r = s.read()
        assert isinstance(r, RespError) and "unknown command" in r
        assert s.call("GET", "ik") == b"a b"
    up = env.assert_counts_exact()
    assert (POOLED or up["ping"] == 2) and up["set"] == 2 and up["get"] == 3 and up["echo"] == 1
    assert up["unknown"] == 1  # NOSUCHCMD: labelled unknown, and still forwarded (the server answered)


def _drain(s: RespSocket, n_replies: int, n_msgs: int, timeout: float = 20.0):
    """Read until n_replies non-push replies and n_msgs pushes have arrived."""
    replies, pushes = [], []
    deadline = time.monotonic() + timeout
    while len(replies) < n_replies or len(pushes) < n_msgs:
        assert time.monotonic() < deadline, (len(replies), len(pushes))
        r = s.read()
        (pushes if isinstance(r, RespPush) else replies).append(r)
    return replies, pushes


def _publisher(proxy, channel: str, n: int, started: threading.Event):
    c = proxy.client()
    started.set()
    for i in range(n):
        c.publish(channel, f"m{i}")


def test_resp3_pushes_are_never_paired_with_replies(env):
    proxy = env.proxy
    setup = proxy.client()
    setup.set("str", "sv")
    setup.rpush("lst", "x")
    N_BATCHES, BATCH, M = 10, 50, 300
    with env.raw() as s:
        hello = s.call("HELLO", "3")
        assert isinstance(hello, dict) and hello[b"proto"] == 3
        s.command("SUBSCRIBE", "chan")
        conf = s.read()
        assert isinstance(conf, RespPush) and conf[0] == b"subscribe"
        started = threading.Event()
        t = threading.Thread(target=_publisher, args=(proxy, "chan", M, started))
        t.start()
        started.wait(5)
        replies, pushes = [], []
        for b in range(N_BATCHES):
            batch = b"".join(encode_resp("GET", "str" if i % 2 == 0 else "lst") for i in range(BATCH))
            s.send(batch)
            r, p = _drain(s, BATCH, 0)
            replies += r
            pushes += p
        t.join(30)
        r, p = _drain(s, 0, M - len(pushes))
        assert not r
        pushes += p
        # after all that, the connection is still in sync
        s.command("UNSUBSCRIBE")
        s.command("GET", "str")
        tail, more = _drain(s, 1, 1)
        assert more[0][0] == b"unsubscribe"
        assert tail == [b"sv"]
    assert len(replies) == N_BATCHES * BATCH
    for i, r in enumerate(replies):
        if i % 2 == 0:
            assert r == b"sv", (i, r)
        else:
            assert isinstance(r, RespError) and r.startswith("WRONGTYPE"), (i, r)
    assert [m[2] for m in pushes] == [f"m{i}".encode() for i in range(M)]
    assert all(m[0] == b"message" for m in pushes)
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert outcomes[("get", "ok")] == N_BATCHES * BATCH // 2 + 1
    assert outcomes[("get", "error")] == N_BATCHES * BATCH // 2
    assert outcomes[("publish", "ok")] == M
    assert proxy.metric_sum("respmeter_push_messages_total", by=())[()] == M
    env.assert_counts_exact()


def test_resp2_subscribed_ping_and_unsubscribe_all_keep_pairing(env):
    """RESP2: messages are arrays like replies; PING while subscribed answers ["pong", x]."""
    proxy = env.proxy
    N, M = 200, 200
    with env.raw() as s:
        s.command("SUBSCRIBE", "c1", "c2")
        s.command("PSUBSCRIBE", "p.*")
        confs = [s.read() for _ in range(3)]
        assert [c[0] for c in confs] == [b"subscribe", b"subscribe", b"psubscribe"]
        assert confs[2][2] == 3
        started = threading.Event()
        t = threading.Thread(target=_publisher, args=(proxy, "p.x", M, started))
        t.start()
        started.wait(5)
        s.send(b"".join(encode_resp("PING", f"x{i}") for i in range(N)))
        pongs, msgs = [], []
        deadline = time.monotonic() + 20
        while len(pongs) < N or len(msgs) < M:
            assert time.monotonic() < deadline
            if len(msgs) >= M:
                t.join(10)
            r = s.read()
            if r[0] == b"pmessage":
                msgs.append(r)
            else:
                pongs.append(r)
        t.join(10)
        assert pongs == [[b"pong", f"x{i}".encode()] for i in range(N)]
        assert [m[3] for m in msgs] == [f"m{i}".encode() for i in range(M)]
        # unsubscribe from everything: 2 channel confirmations, then 1 pattern confirmation,
        # then ordinary replies again
        s.send(encode_resp("UNSUBSCRIBE") + encode_resp("PUNSUBSCRIBE") + encode_resp("SET", "a", "1")
               + encode_resp("GET", "a"))
        r = [s.read() for _ in range(5)]
        assert sorted(x[1] for x in r[:2]) == [b"c1", b"c2"]
        assert r[2][:1] == [b"punsubscribe"] and r[2][2] == 0
        assert r[3:] == [b"OK", b"1"]
        # UNSUBSCRIBE while subscribed to nothing: one confirmation, then still in sync
        s.send(encode_resp("UNSUBSCRIBE") + encode_resp("GET", "a"))
        assert s.read() == [b"unsubscribe", None, 0]
        assert s.read() == b"1"
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert outcomes[("ping", "ok")] == N
    assert outcomes[("get", "ok")] == 2
    assert outcomes[("set", "ok")] == 1
    assert proxy.metric_sum("respmeter_push_messages_total", by=())[()] == M
    up = env.assert_counts_exact()
    assert up["unsubscribe"] == 2 and up["punsubscribe"] == 1


@pytest.mark.parametrize("hot_path", ["C", "Python"])
def test_everything_on_one_proxy_counts_exactly(redis_factory, proxy_factory, hot_path):
    """All of the above on one proxy, many connections, then one exact comparison, per client too;
    with the C hot path and with the pure-Python one (RESPMETER_PURE_PYTHON=1)."""
    server = redis_factory()
    proxy = proxy_factory(server, env={"RESPMETER_PURE_PYTHON": "1"} if hot_path == "Python" else None)
    assert f"hot path: {hot_path}" in proxy.log_text()
    assert f'respmeter_build_info{{hot_path="{hot_path}",version=' in proxy.metrics_text()
    e = Env(server, proxy)
    c = proxy.client(client_name="alpha")
    for i in range(20):
        c.set(f"a{i}", i)
    p = c.pipeline(transaction=True)
    p.incr("a-ctr").incr("a-ctr")
    assert p.execute() == [1, 2]
    assert c.eval("return ARGV[1]", 0, "z") == b"z"
    c.rpush("bq", "v")
    assert c.brpop("bq", timeout=1) == (b"bq", b"v")
    with RespSocket(proxy.host, proxy.port) as s:
        hello = s.call("HELLO", "3", "SETNAME", "beta")
        assert hello[b"proto"] == 3
        s.send(b"PING\r\n" + encode_resp("GET", "a1") + encode_resp("GET", "a2"))
        assert [s.read() for _ in range(3)] == [b"PONG", b"1", b"2"]
        assert s.call("CLIENT", "SETNAME", "gamma") == b"OK"
        assert s.call("INCR", "g") == 1
    delta = e.server_delta()
    assert_upstream_matches_commandstats(proxy, delta, e.known)
    by_client = proxy.metric_sum("respmeter_upstream_commands_total", by=("client", "command"))
    assert by_client[("alpha", "set")] == 20
    assert by_client[("alpha", "incrby")] == 2  # redis-py 8: INCR is sent as INCRBY
    assert by_client[("alpha", "multi")] == 1 and by_client[("alpha", "exec")] == 1
    assert by_client[("alpha", "eval")] == 1 and by_client[("alpha", "brpop")] == 1
    assert (POOLED or by_client[("beta", "ping")] == 1) and by_client[("beta", "get")] == 2
    assert by_client[("gamma", "incr")] == 1
    assert ("beta", "incr") not in by_client and ("anonymous", "set") not in by_client
    # per client, the totals add up to the server's count
    per_cmd: dict[str, float] = {}
    for (client, cmd), n in by_client.items():  # (the proxy's own too: the upstream pool's handshakes)
        if cmd in e.known:  # left out: "unknown" and what the server does not know (client|setinfo)
            per_cmd[cmd] = per_cmd.get(cmd, 0) + n
    assert per_cmd == {k: float(v) for k, v in delta.items()}


# --------------------------------------------------------------------------------------------
# the rest of the per-connection state the proxy must keep meaningful
# --------------------------------------------------------------------------------------------


def test_select_blmove_xread_block_wait_function(env):
    p = env.proxy
    r = p.client(protocol=3)
    # SELECT: per-connection database, isolated from db 0
    c1 = redis.Redis(host=p.host, port=p.port, db=1, protocol=2)
    assert c1.set("sel", "one") is True
    assert r.get("sel") is None
    assert c1.get("sel") == b"one"
    # BLMOVE that times out, then one served by another client while it blocks
    assert r.blmove("src", "dst", 0.2, "LEFT", "RIGHT") is None
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", p.client().blmove("src2", "dst2", 5, "LEFT", "RIGHT")))
    t.start()
    time.sleep(0.3)
    p.client().rpush("src2", "job")
    t.join(10)
    assert out["v"] == b"job"
    # XREAD BLOCK: returns when another client adds an entry
    r.xadd("st", {"a": "1"}, id="1-0")
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("v", p.client(protocol=2).xread({"st": "$"}, block=5000)))
    t.start()
    time.sleep(0.3)
    p.client().xadd("st", {"b": "2"}, id="2-0")
    t.join(10)
    assert res["v"] and res["v"][0][1][0][0] == b"2-0"
    # WAIT (no replicas): answers 0 at once
    assert r.wait(0, 100) == 0
    # FUNCTION LOAD + FCALL (no redis.call inside, so the server counts nothing we cannot see)
    code = "#!lua name=rmlib\nredis.register_function('rm_echo', function(keys, args) return args[1] end)"
    assert r.function_load(code, replace=True) in ("rmlib", b"rmlib")
    assert r.fcall("rm_echo", 0, "hi") in (b"hi", "hi")
    env.assert_counts_exact()


@pytest.mark.parametrize("protocol", [2, 3])
def test_sharded_pubsub(env, protocol):
    p = env.proxy
    s = RespSocket(p.host, p.port)
    if protocol == 3:
        assert isinstance(s.call("HELLO", "3"), dict)
    s.send(encode_resp("SSUBSCRIBE", "shard-a", "shard-b"))
    confirmations = [s.read(), s.read()]
    assert all(c[0] == b"ssubscribe" for c in confirmations), confirmations
    pub = p.client()
    assert pub.spublish("shard-a", "m1") == 1
    msg = s.read()
    assert list(msg) == [b"smessage", b"shard-a", b"m1"], msg
    # replies still pair after the pushes
    s.send(encode_resp("SUNSUBSCRIBE"))
    assert [s.read()[0] for _ in range(2)] == [b"sunsubscribe", b"sunsubscribe"]
    assert s.call("PING") in ("PONG", b"PONG")
    s.close()
    env.assert_counts_exact()


def test_client_tracking_invalidations_are_pushes(env):
    p = env.proxy
    s = RespSocket(p.host, p.port)
    assert isinstance(s.call("HELLO", "3"), dict)
    assert s.call("CLIENT", "TRACKING", "ON") in ("OK", b"OK")
    assert s.call("GET", "tracked") is None
    p.client().set("tracked", "changed")  # another client: the server sends an invalidation push
    time.sleep(0.2)
    # the next reply on this connection must be GET's, with the push passed through beside it
    s.send(encode_resp("GET", "tracked"))
    seen = [s.read(), s.read()]
    pushes = [x for x in seen if isinstance(x, RespPush)]
    replies = [x for x in seen if not isinstance(x, RespPush)]
    assert len(pushes) == 1 and pushes[0][0] == b"invalidate", seen
    assert replies == [b"changed"], seen
    s.close()
    assert p.metric_sum("respmeter_push_messages_total", by=())[()] >= 1
    env.assert_counts_exact()


def test_monitor_streams_other_clients_commands(env):
    p = env.proxy
    m = RespSocket(p.host, p.port)
    assert m.call("MONITOR") in ("OK", b"OK")
    p.client().set("watched", "1")
    lines = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(b'"watched"' in x for x in lines if isinstance(x, bytes)):
        x = m.read()
        lines.append(x if isinstance(x, bytes) else str(x).encode())
    assert any(b'"set"' in x.lower() and b'"watched"' in x for x in lines), lines
    m.close()
