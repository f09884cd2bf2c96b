"""The events, ping, handshake and sweeps savers (proxy.savers, proxy.events) against a real
redis-server, and how savers are chosen (--savers, [savers], RESPMETER_SAVERS). What a client reads
is compared, byte for byte, with what the server sends a direct client for the same commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import RespSocket, commandstats, commandstats_delta, encode_resp

HB = "/0.celeryev/worker.heartbeat"


def _upstream(proxy) -> dict[str, int]:
    return {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}


def _saved(proxy) -> dict[tuple, int]:
    return {k: int(v) for k, v in proxy.metric_sum(
        "respmeter_saved_commands_total", by=("command", "saver")).items() if v}


def _recv_all(sock: socket.socket, settle: float = 0.15) -> bytes:
    """Everything that arrives until the connection is quiet for ``settle`` seconds."""
    out = b""
    sock.settimeout(settle)
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            return out
        if not chunk:
            return out
        out += chunk


def _conn(host: str, port: int, *commands: list) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    for c in commands:
        s.sendall(encode_resp(*c))
        _recv_all(s)
    return s


# -- events ------------------------------------------------------------------------------------------

@pytest.fixture
def events_env(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "events", "--saver-recheck", "1.5"])
    return server, proxy, server.client()


def test_heartbeats_answered_and_delivered_by_the_proxy_in_server_framing(events_env):
    server, proxy, obs = events_env
    before = commandstats(obs)
    p2 = _conn(proxy.host, proxy.port, ["PSUBSCRIBE", "/0.celeryev/worker.*"])
    s3 = _conn(proxy.host, proxy.port, ["HELLO", "3"], ["SUBSCRIBE", HB])
    both = _conn(proxy.host, proxy.port, ["SUBSCRIBE", HB], ["PSUBSCRIBE", "/0.celeryev/*"])
    pub = _conn(proxy.host, proxy.port)
    replies = []
    for i in range(6):
        pub.sendall(encode_resp("PUBLISH", HB, f"beat-{i}"))
        replies.append(_recv_all(pub, 0.1))
    # the server counts 4 subscriptions; the proxy says the same
    assert replies == [b":4\r\n"] * 6
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("publish") == 1, delta  # the first one learnt who listens
    msgs = [f"beat-{i}".encode() for i in range(6)]
    ch = HB.encode()

    def m2(d: bytes) -> bytes:
        return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(d), d)

    def pm(head: bytes, pat: bytes, d: bytes) -> bytes:
        return head + b"4\r\n$8\r\npmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(pat), pat, len(ch), ch, len(d), d)

    assert _recv_all(p2) == b"".join(pm(b"*", b"/0.celeryev/worker.*", d) for d in msgs)
    assert _recv_all(s3) == b"".join(b">3" + m2(d)[2:] for d in msgs)
    assert _recv_all(both) == b"".join(m2(d) + pm(b"*", b"/0.celeryev/*", d) for d in msgs)
    assert _saved(proxy).get(("publish", "events")) == 5
    local = proxy.metric_sum("respmeter_commands_total", by=("outcome",), command="publish")
    assert local.get("local") == 5 and local.get("ok") == 1


def test_direct_subscriber_mid_run_gets_messages_after_the_recheck(events_env):
    server, proxy, obs = events_env
    mine = _conn(proxy.host, proxy.port, ["SUBSCRIBE", HB])
    pub = _conn(proxy.host, proxy.port)
    pub.sendall(encode_resp("PUBLISH", HB, "a"))
    assert _recv_all(pub, 0.1) == b":1\r\n"
    direct = _conn(server.host, server.port, ["SUBSCRIBE", HB])  # not through the proxy
    t0 = time.monotonic()
    seen_direct = []
    n = 0
    while time.monotonic() - t0 < 3.5:
        n += 1
        pub.sendall(encode_resp("PUBLISH", HB, f"m{n}"))
        r = _recv_all(pub, 0.05)
        if r == b":2\r\n":
            break
        assert r == b":1\r\n"
        time.sleep(0.1)
    waited = time.monotonic() - t0
    assert r == b":2\r\n", "the recheck never saw the direct subscriber"
    assert waited <= 1.5 + 0.5, waited  # at most one recheck period
    # from then on every PUBLISH goes upstream and the direct subscriber gets it
    for i in range(3):
        pub.sendall(encode_resp("PUBLISH", HB, f"after{i}"))
        assert _recv_all(pub, 0.05) == b":2\r\n"
    got = _recv_all(direct)
    seen_direct = [m for m in (f"m{n}".encode(), b"after0", b"after1", b"after2") if m in got]
    assert len(seen_direct) == 4, got
    mine_got = _recv_all(mine)
    for i in range(1, n + 1):
        assert f"m{i}".encode() in mine_got  # the proxy's own subscriber missed nothing


def test_unwatched_channels_and_pubsub_state_changes(events_env):
    server, proxy, obs = events_env
    before = commandstats(obs)
    pub = _conn(proxy.host, proxy.port)
    for _ in range(3):
        pub.sendall(encode_resp("PUBLISH", "other-channel", "x"))
        assert _recv_all(pub, 0.05) == b":0\r\n"
    # nobody listens on the heartbeat channel: after the first, answered 0 locally
    for _ in range(3):
        pub.sendall(encode_resp("PUBLISH", HB, "x"))
        assert _recv_all(pub, 0.05) == b":0\r\n"
    sub = _conn(proxy.host, proxy.port, ["SUBSCRIBE", HB])
    pub.sendall(encode_resp("PUBLISH", HB, "y"))  # a new local subscriber: counted again upstream
    assert _recv_all(pub, 0.05) == b":1\r\n"
    sub.sendall(encode_resp("UNSUBSCRIBE"))
    _recv_all(sub)
    pub.sendall(encode_resp("PUBLISH", HB, "z"))
    assert _recv_all(pub, 0.05) == b":0\r\n"
    assert _recv_all(sub) == b""  # unsubscribed: nothing delivered by the proxy either
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("publish") == 3 + 1 + 1 + 1, delta


def test_a_subscriber_that_never_reads_is_closed_not_buffered(events_env):
    """The proxy's own deliveries count against the subscriber like Redis's pub/sub output limit:
    a subscriber that reads nothing is closed, the proxy's memory stays bounded, and the
    publisher is not slowed."""
    server, proxy, obs = events_env
    lazy = socket.create_connection((proxy.host, proxy.port))
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.sendall(encode_resp("SUBSCRIBE", HB))
    time.sleep(0.2)
    pub = RespSocket(proxy.host, proxy.port)
    rss0 = support.rss_kb(proxy.pid)
    payload = b"x" * 65536
    t0 = time.monotonic()
    worst = 0.0
    closed_at = None
    for i in range(1200):  # 75 MB
        t = time.monotonic()
        r = pub.call("PUBLISH", HB, payload)
        worst = max(worst, time.monotonic() - t)
        if r == 0 and closed_at is None:
            closed_at = i
    growth_mb = (support.rss_kb(proxy.pid) - rss0) / 1024
    assert closed_at is not None, "the subscriber that reads nothing was never dropped"
    assert growth_mb < 60, growth_mb
    assert worst < 1.0, worst
    assert time.monotonic() - t0 < 30




# -- ping --------------------------------------------------------------------------------------------

PING_SCRIPT = [
    ["PING"], ["PING", "hello"], ["SUBSCRIBE", "c1"], ["PING"], ["PING", "redis-py-health-check"],
    ["PSUBSCRIBE", "p*"], ["PING"], ["UNSUBSCRIBE"], ["PUNSUBSCRIBE"], ["PING"], ["PING", "a", "b"],
]


@pytest.mark.parametrize("protocol", [2, 3])
def test_local_ping_replies_equal_the_servers(redis_factory, proxy_factory, protocol):
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "ping"])
    obs = server.client()
    outs = []
    for host, port in ((server.host, server.port), (proxy.host, proxy.port)):
        s = _conn(host, port, *([["HELLO", "3"]] if protocol == 3 else []))
        s.sendall(encode_resp("GET", "warm"))  # the upstream has replied: PING may be answered here
        _recv_all(s)
        got = []
        for c in PING_SCRIPT:
            s.sendall(encode_resp(*c))
            got.append(_recv_all(s, 0.1))
        outs.append(got)
        s.close()
    assert outs[0] == outs[1]
    saved = _saved(proxy).get(("ping", "ping"), 0)
    assert saved == 6  # every PING but the wrong-arity one


def test_ping_goes_upstream_until_the_upstream_has_replied(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "ping"])
    obs = server.client()
    before = commandstats(obs)
    s = RespSocket(proxy.host, proxy.port)
    assert s.call("PING") == b"PONG"  # nothing proven yet: the server answers
    assert s.call("PING") == b"PONG"  # now the proxy does
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("ping") == 1, delta


def test_client_is_closed_when_its_upstream_dies(redis_factory, proxy_factory):
    """kombu needs no missed PONG to notice: the connection closes with the upstream's."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "ping"])
    s = RespSocket(proxy.host, proxy.port)
    s.call("PING")
    assert s.call("PING") == b"PONG"
    server.kill()
    s.sock.settimeout(5)
    t = time.monotonic()
    assert s.sock.recv(100) == b""
    assert time.monotonic() - t < 3


# -- handshake ---------------------------------------------------------------------------------------

def test_connect_get_disconnect_costs_two_commands(redis_factory, proxy_factory):
    redis = pytest.importorskip("redis")
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "handshake"])
    for _ in range(5):
        c = redis.Redis(host=proxy.host, port=proxy.port, protocol=3)
        assert c.get("k") is None
        c.close()
    up = _upstream(proxy)
    # the first connection's CLIENT SETINFO x2 and MAINT_NOTIFICATIONS went upstream, the rest not
    assert up.get("client|setinfo") == 2 and up.get("client|maint_notifications") == 1, up
    assert up.get("hello") == 5 and up.get("get") == 5, up
    saved = _saved(proxy)
    assert saved.get(("client|setinfo", "handshake")) == 8
    assert saved.get(("client|maint_notifications", "handshake")) == 4


def test_handshake_replies_are_the_servers_first_ones(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "handshake"])
    cmds = [["CLIENT", "SETINFO", "LIB-NAME", "mylib"], ["CLIENT", "SETINFO", "LIB-VER", "1.0"],
            ["CLIENT", "SETINFO", "BOGUS", "x"], ["CLIENT", "MAINT_NOTIFICATIONS", "ON"]]
    direct = [RespSocket(server.host, server.port).call(*c) for c in cmds]
    for _ in range(3):
        s = RespSocket(proxy.host, proxy.port)
        assert [s.call(*c) for c in cmds] == direct


# -- sweeps ------------------------------------------------------------------------------------------

# a script that does what kombu's binding sweep does (written here, recognised by its shape)
SWEEP = textwrap.dedent("""
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000
    local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
    for _, name in ipairs(due) do
        redis.call('DEL', ARGV[1] .. name)
        redis.call('ZREM', KEYS[1], name)
    end
    return #due
""")


def test_sweep_runs_at_most_every_sweep_every(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "sweeps", "--saver-sweep-every", "1"])
    obs = server.client()
    before = commandstats(obs)
    s = RespSocket(proxy.host, proxy.port)
    sha = s.call("SCRIPT", "LOAD", SWEEP)
    other = s.call("SCRIPT", "LOAD", "return redis.call('INCR', KEYS[1])")
    results = [s.call("EVALSHA", sha, "1", "deadlines", "table:", "100") for _ in range(5)]
    assert results == [0] * 5
    incrs = [s.call("EVALSHA", other, "1", "n") for _ in range(3)]
    assert incrs == [1, 2, 3]  # any other script runs every time
    time.sleep(1.1)
    assert s.call("EVALSHA", sha, "1", "deadlines", "table:", "100") == 0
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("evalsha") == 1 + 3 + 1, delta
    assert _saved(proxy).get(("evalsha", "sweeps")) == 4


# -- choosing savers ---------------------------------------------------------------------------------

def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30,
                          env=e, cwd=support.REPO_ROOT)


def test_bad_saver_names_are_clear_errors(tmp_path):
    r = _run("run", "--savers", "celery,polll,pong", "--state-dir", str(tmp_path))
    assert r.returncode == 2
    assert "unknown savers 'polll', 'pong'" in r.stderr and "poll, events, ping, handshake, sweeps" in r.stderr
    for flag, value, why in (("--saver-hold", "nan", "not a finite number"), ("--saver-hold", "0.5", "between 1"),
                             ("--saver-recheck", "inf", "not a finite number"), ("--saver-channels", "", "empty")):
        r = _run("run", "--savers", "celery", flag, value, "--state-dir", str(tmp_path))
        assert r.returncode == 2 and why in r.stderr, (flag, value, r.stderr)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[savers]\nenable = ["celery", 5]\nhold = -1\nsweep_every = nan\nbogus = 1\n')
    r = _run("check-config", str(cfg))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "savers.hold" in out and "savers.bogus: unknown key" in out
    assert "savers.enable: must be a list of saver names" in out and "savers.sweep_every: not a finite" in out


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_savers_are_chosen_by_flag_env_or_file(redis_factory, proxy_factory, tmp_path, how):
    server = redis_factory()
    args, env = [], {}
    if how == "flag":
        args = ["--savers", "ping,handshake"]
    elif how == "env":
        env = {"RESPMETER_SAVERS": "ping,handshake"}
    else:
        cfg = tmp_path / "r.toml"
        cfg.write_text('[savers]\nenable = ["ping", "handshake"]\n')
        args = ["--config", str(cfg)]
    proxy = proxy_factory(server, args, env=env)
    assert "savers: ping, handshake" in proxy.log_text()
    s = RespSocket(proxy.host, proxy.port)
    s.call("GET", "x")
    assert s.call("PING") == b"PONG"
    assert _saved(proxy).get(("ping", "ping")) == 1


def test_sweep_loaded_before_the_proxy_started_is_learnt_with_one_noscript(redis_factory, proxy_factory):
    """The server already has the sweep (loaded before this proxy started): its first EVALSHA on the
    binding deadline set gets NOSCRIPT once, redis-py loads the script, and from then on the proxy
    knows its body. Other scripts are never answered NOSCRIPT."""
    redis = pytest.importorskip("redis")
    server = redis_factory()
    obs = server.client()
    obs.script_load(SWEEP)  # directly: the proxy never sees this
    other_sha = obs.script_load("return 7")
    proxy = proxy_factory(server, ["--savers", "sweeps"])
    c = redis.Redis(host=proxy.host, port=proxy.port)
    sweep = c.register_script(SWEEP)
    before = commandstats(obs)
    assert [sweep(keys=["_kombu.binding_deadlines"], args=["t:", "100"]) for _ in range(4)] == [0] * 4
    assert c.evalsha(other_sha, 0) == 7
    delta = commandstats_delta(before, commandstats(obs))
    # NOSCRIPT (local), SCRIPT LOAD, one EVALSHA upstream, three saved; the other script ran
    assert delta.get("script|load") == 1 and delta.get("evalsha") == 2, delta
    assert _saved(proxy).get(("evalsha", "sweeps")) == 3


def test_savers_with_an_empty_command_policy(redis_factory, proxy_factory):
    """--deny-commands '' (nothing denied) with savers: the command policy is absent, the savers'
    commands still reach them (a PING on a fresh connection once got no answer here)."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--deny-commands", "", "--savers", "celery"])
    s = RespSocket(proxy.host, proxy.port)
    assert s.call("PING") == b"PONG"
    assert s.call("PING") == b"PONG"
    assert s.call("CONFIG", "GET", "maxmemory") == [b"maxmemory", b"0"]
    assert _saved(proxy).get(("ping", "ping")) == 1


def test_a_client_with_thousands_of_patterns_turns_elision_off_not_the_proxy(events_env):
    """Subscriptions past the tracking bound make the proxy forward every watched PUBLISH (the
    server does the matching) instead of matching thousands of patterns itself per message."""
    server, proxy, obs = events_env
    many = socket.create_connection((proxy.host, proxy.port), timeout=10)
    pats = [f"/0.celeryev/w{i}.*" for i in range(1100)]
    many.sendall(encode_resp("PSUBSCRIBE", *pats))
    got = b""
    while got.count(b"psubscribe") < len(pats):
        got += many.recv(1 << 20)
    before = commandstats(obs)
    pub = RespSocket(proxy.host, proxy.port)
    for _ in range(5):
        assert pub.call("PUBLISH", HB, "x") == 0
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("publish") == 5, delta
    many.close()


def test_a_handshake_sent_under_client_reply_skip_is_not_remembered(redis_factory, proxy_factory):
    """The server sends no reply to a command under CLIENT REPLY SKIP: nothing is recorded for it,
    and the next client's same CLIENT SETINFO gets the server's real answer, not an empty one
    (which left redis-py waiting in its handshake)."""
    server = redis_factory()
    proxy = proxy_factory(server, ["--savers", "handshake"])
    setinfo = ("CLIENT", "SETINFO", "LIB-VER", "9.9")
    direct = RespSocket(server.host, server.port).call(*setinfo)
    a = RespSocket(proxy.host, proxy.port)
    a.send(encode_resp("CLIENT", "REPLY", "SKIP") + encode_resp(*setinfo))
    assert a.call("PING") == b"PONG"
    for _ in range(2):
        b = RespSocket(proxy.host, proxy.port, timeout=5)
        assert b.call(*setinfo) == direct
