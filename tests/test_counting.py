"""What the proxy counts: ``respmeter_commands_total{client,command,outcome}`` and the per-client
labels of ``respmeter_upstream_commands_total``, against real redis-server processes.

Raw sockets are used where the exact commands on a connection matter (redis-py adds handshake
commands of its own).
"""

from __future__ import annotations

import pytest


from support import (
    POOLED,
    RespError,
    RespSocket,
    assert_counts_match,
    commandstats,
    commandstats_delta,
    encode_resp,
    server_known_commands,
)


def _errorstats(client) -> dict[str, int]:
    out = {}
    for k, v in client.info("errorstats").items():
        if k.startswith("errorstat_"):
            out[k[len("errorstat_"):]] = int(v["count"])
    return out


def _counts(proxy, name="respmeter_commands_total", by=("client", "command", "outcome")):
    return {k: int(v) for k, v in proxy.metric_sum(name, by=by).items() if v}


def _own(proxy, known=None) -> dict[str, int]:
    """What the proxy sent upstream on its own behalf (client respmeter: the upstream pool's
    handshakes), by command; only the names ``known`` to the server when given."""
    up = _counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    return {cmd: n for (c, cmd), n in up.items() if c == "respmeter" and (known is None or cmd in known)}


def _answered(proxy, client, command) -> int:
    """Commands of ``client`` answered, by the server (ok, error) or by the proxy (local)."""
    counts = _counts(proxy)
    return sum(counts.get((client, command, o), 0) for o in ("ok", "error", "local"))


def _upstream_matches(proxy, delta, known):
    """respmeter_upstream_commands_total by command == the commandstats delta, for every command the
    server knows (``known``: :func:`support.server_known_commands`, read before the baseline)."""
    up = {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}
    return assert_counts_match(up, delta, known)


def test_outcome_ok_error_and_unknown_command_forwarded(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    err_before = _errorstats(obs)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("SET", "s", "-ERR this is a value, not an error") == b"OK"
        assert s.call("RPUSH", "l", "a") == 1
        r = s.call("GET", "l")
        assert isinstance(r, RespError) and r.startswith("WRONGTYPE")
        # a bulk that looks like an error line is still an ok reply
        assert s.call("GET", "s") == b"-ERR this is a value, not an error"
        r = s.call("FOOBAR", "x")
        # the server's own wording: the command was forwarded, not answered by the proxy
        assert isinstance(r, RespError) and r.startswith("ERR unknown command 'FOOBAR'"), r
        r = s.call("CLIENT", "NOSUCHSUB")
        assert isinstance(r, RespError) and "unknown subcommand" in r.lower(), r
        r = s.call("GET", "a", "b")  # arity error: a known command, rejected by the server
        assert isinstance(r, RespError) and "wrong number of arguments" in r
        assert s.call("INCR", "s") == RespError("ERR value is not an integer or out of range")
        # errors in a pipeline keep their outcome per command
        s.send(encode_resp("GET", "l") + encode_resp("GET", "s") + encode_resp("NOPE") + encode_resp("GET", "l"))
        rs = [s.read() for _ in range(4)]
        assert [isinstance(x, RespError) for x in rs] == [True, False, True, True]
    counts = _counts(proxy)
    assert counts == {
        ("anonymous", "set", "ok"): 1,
        ("anonymous", "rpush", "ok"): 1,
        ("anonymous", "get", "error"): 4,
        ("anonymous", "get", "ok"): 2,
        ("anonymous", "incr", "error"): 1,
        ("anonymous", "unknown", "error"): 3,
    }
    up = _counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    assert up[("anonymous", "unknown")] == 3  # unknown commands are still forwarded
    err_after = _errorstats(obs)
    # the server itself answered all three unknown commands and the arity error (and, with a pool,
    # each shared connection's probes of what it does not know)
    probes = sum(n for cmd, n in _own(proxy).items() if cmd not in known)
    assert err_after.get("ERR", 0) - err_before.get("ERR", 0) == 3 + 1 + 1 + probes  # + INCR's error
    assert err_after.get("WRONGTYPE", 0) - err_before.get("WRONGTYPE", 0) == 3
    delta = commandstats_delta(before, commandstats(obs))
    delta["info"] = delta.get("info", 0) - 2  # the two errorstats reads
    delta = {k: v for k, v in delta.items() if v}
    _upstream_matches(proxy, delta, known)


def test_client_setname_and_hello_setname_change_the_label(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    with RespSocket(proxy.host, proxy.port) as a:
        assert a.call("GET", "k") is None  # before naming: anonymous
        assert a.call("CLIENT", "SETNAME", "alpha") == b"OK"
        assert a.call("SET", "k", "1") == b"OK"
        assert a.call("GET", "k") == b"1"
        assert a.call("CLIENT", "SETNAME", "alpha2") == b"OK"  # renamed
        assert a.call("GET", "k") == b"1"
        assert a.call("CLIENT", "SETNAME", "") == b"OK"  # name cleared
        assert a.call("EXISTS", "k") == 1
    with RespSocket(proxy.host, proxy.port) as b:
        hello = b.call("HELLO", "3", "SETNAME", "beta")
        assert hello[b"proto"] == 3
        assert b.call("PING") == b"PONG"
        assert b.call("PING") == b"PONG"
        assert b.call("RESET") == b"RESET"  # RESET clears the name
        assert b.call("DBSIZE") == 1
        r = b.call("CLIENT", "SETNAME", "has space")  # refused by the server: label unchanged
        assert isinstance(r, RespError)
        assert b.call("DBSIZE") == 1
    with RespSocket(proxy.host, proxy.port) as c:
        r = c.call("HELLO", "9", "SETNAME", "nope")  # refused (NOPROTO): no rename
        assert isinstance(r, RespError) and r.startswith("NOPROTO")
        assert c.call("ECHO", "x") == b"x"
    up = _counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    assert up[("anonymous", "get")] == 1
    assert up[("alpha", "set")] == 1 and up[("alpha", "get")] == 1
    assert up[("alpha2", "get")] == 1
    assert up[("anonymous", "exists")] == 1
    assert _answered(proxy, "beta", "ping") == 2 and (POOLED or up[("beta", "ping")] == 2)
    assert up[("anonymous", "dbsize")] == 2
    assert up[("anonymous", "echo")] == 1
    assert not any(k[0] == "nope" or k[0] == "has space" for k in up)
    assert ("beta", "dbsize") not in up


def test_names_beyond_client_label_limit_become_other(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server, ["--client-label-limit", "2"])
    for i in range(1, 6):
        with RespSocket(proxy.host, proxy.port) as s:
            assert s.call("CLIENT", "SETNAME", f"n{i}") == b"OK"
            assert s.call("PING") == b"PONG"
    with RespSocket(proxy.host, proxy.port) as s:  # an admitted name stays itself
        assert s.call("HELLO", "2", "SETNAME", "n1")[:2] == [b"server", b"redis"]
        assert s.call("PING") == b"PONG"
    with RespSocket(proxy.host, proxy.port) as s:  # unnamed clients are not "other"
        assert s.call("PING") == b"PONG"
    pings: dict[str, int] = {}
    for (client, cmd, _outcome), n in _counts(proxy).items():
        if cmd == "ping":
            pings[client] = pings.get(client, 0) + n
    assert pings == {"n1": 2, "n2": 1, "other": 3, "anonymous": 1}
    clients = {k[0] for k in _counts(proxy)}
    assert clients <= {"n1", "n2", "other", "anonymous"}


def test_pipelined_setname_labels_the_commands_behind_it(redis_factory, proxy_factory):
    """CLIENT SETNAME / HELLO SETNAME sent in the same write as the commands after it: the server runs
    those commands under the new name, so they are counted under it."""
    server = redis_factory()
    proxy = proxy_factory(server)
    with RespSocket(proxy.host, proxy.port) as s:
        s.send(encode_resp("CLIENT", "SETNAME", "piped") + encode_resp("SET", "p", "1") + encode_resp("GET", "p"))
        assert [s.read() for _ in range(3)] == [b"OK", b"OK", b"1"]
    with RespSocket(proxy.host, proxy.port) as s:
        s.send(encode_resp("HELLO", "3", "SETNAME", "piped3") + encode_resp("GET", "p"))
        assert isinstance(s.read(), dict)
        assert s.read() == b"1"
    up = _counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    assert up.get(("piped", "set")) == 1 and up.get(("piped", "get")) == 1, up
    assert up.get(("piped3", "get")) == 1, up


def test_client_reply_off_and_skip_are_counted_without_replies(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    with RespSocket(proxy.host, proxy.port) as s:
        s.send(encode_resp("CLIENT", "REPLY", "OFF") + encode_resp("SET", "a", "1") + encode_resp("INCR", "a")
               + encode_resp("CLIENT", "REPLY", "ON") + encode_resp("GET", "a"))
        assert s.read() == b"OK"  # only CLIENT REPLY ON answers
        assert s.read() == b"2"
        s.send(encode_resp("CLIENT", "REPLY", "SKIP") + encode_resp("INCR", "a") + encode_resp("GET", "a"))
        assert s.read() == b"3"
        assert s.call("PING") == b"PONG"
    delta = commandstats_delta(before, commandstats(obs))
    _upstream_matches(proxy, delta, known)
    counts = _counts(proxy, by=("command",))
    assert counts["get"] == 2 and counts["incr"] == 2 and counts["set"] == 1


def test_inline_request_with_nul_byte_is_not_counted_unless_redis_runs_it(redis_factory, proxy_factory):
    """Redis 7.0 looks for the inline request's LF with strchr(), so a NUL byte before it leaves the
    request incomplete forever: the server never runs it. The proxy must frame it the same way
    (its parser claims to be at least as strict as Redis's) and so must not count it as billable."""
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("PING") == b"PONG"
        s.send(b"PING a\x00b\r\n")
        s.sock.settimeout(0.5)
        with pytest.raises(OSError):  # the server itself never answers (timeout)
            s.read()
    delta = commandstats_delta(before, commandstats(obs))
    own = _own(proxy, known)
    assert {k: v - own.get(k, 0) for k, v in delta.items() if v != own.get(k, 0)} == ({} if POOLED else {"ping": 1})
    _upstream_matches(proxy, delta, known)


def test_commands_the_upstream_does_not_know_keep_their_table_name(redis_factory, proxy_factory):
    """CLIENT SETINFO (redis-py 5+ sends it on every connection) is in the proxy's command table (from
    Valkey 8 / Redis 7.2), so it is labelled ``client|setinfo``, not ``unknown``, and forwarded. Redis
    7.0 rejects it as an unknown subcommand and does not count it: the comparison leaves out exactly
    the names the server does not know."""
    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    known = server_known_commands(obs)
    server_has_setinfo = "client|setinfo" in known  # Redis 7.2+ (e.g. $REDIS_SERVER pointing at one)
    before = commandstats(obs)
    with RespSocket(proxy.host, proxy.port) as s:
        r = s.call("CLIENT", "SETINFO", "LIB-NAME", "respmeter-test")
        if server_has_setinfo:
            assert r == b"OK"
        else:
            assert isinstance(r, RespError) and "unknown subcommand" in r.lower(), r
        r = s.call("CLIENT", "NOSUCHSUB")
        assert isinstance(r, RespError) and "unknown subcommand" in r.lower(), r
        assert s.call("PING") == b"PONG"
    delta = commandstats_delta(before, commandstats(obs))
    outcome = "ok" if server_has_setinfo else "error"
    # (on the pool, the proxy answers CLIENT SETINFO as the server does, learnt by each shared
    # connection's own probe; the unknown subcommand takes the client off the pool, so its PING
    # goes upstream)
    assert _counts(proxy, by=("command", "outcome")) == {
        ("client|setinfo", "local" if POOLED else outcome): 1,
        ("unknown", "error"): 1,
        ("ping", "ok"): 1,
    }
    left_out = _upstream_matches(proxy, delta, known)
    expected = {"unknown": 1} if server_has_setinfo or POOLED else {"client|setinfo": 1, "unknown": 1}
    for cmd, n in _own(proxy).items():
        if cmd not in known:
            expected[cmd] = expected.get(cmd, 0) + n
    assert left_out == expected


def test_redis_py_handshake_the_server_refuses_is_billed_as_errors(redis_factory, proxy_factory):
    """redis-py 8 connects with HELLO 3, CLIENT MAINT_NOTIFICATIONS and CLIENT SETINFO x2. Redis 7.0
    refuses the last three (unknown subcommands) and leaves them out of commandstats, but a hosted
    service bills them: the proxy forwards them, counts them under their table names with outcome
    error, and counts them as sent upstream."""
    import redis

    server = redis_factory()
    proxy = proxy_factory(server)
    obs = server.client()
    known = server_known_commands(obs)
    server_has_setinfo = "client|setinfo" in known  # Redis 7.2+ (e.g. $REDIS_SERVER pointing at one)
    assert "client|maint_notifications" not in known  # no open-source server knows it
    before = commandstats(obs)
    err_before = _errorstats(obs)
    c = proxy.client()  # redis-py's defaults: RESP3, maintenance notifications "auto", lib name/version
    assert int(redis.__version__.split(".")[0]) >= 8, redis.__version__
    assert c.set("k", "v") is True and c.get("k") == b"v"
    setinfo = "ok" if server_has_setinfo else "error"
    hs = "local" if POOLED else None  # (the pool answers the handshake as the server would)
    assert _counts(proxy, by=("command", "outcome")) == {
        ("hello", hs or "ok"): 1,
        ("client|maint_notifications", hs or "error"): 1,
        ("client|setinfo", hs or setinfo): 2,
        ("set", "ok"): 1,
        ("get", "ok"): 1,
    }
    mine = {k: v for k, v in _counts(proxy, "respmeter_upstream_commands_total", by=("client", "command")).items()
            if k[0] != "respmeter"}
    up = {cmd: n for (_c, cmd), n in mine.items()}
    assert up == ({"set": 1, "get": 1} if POOLED else
                  {"hello": 1, "client|maint_notifications": 1, "client|setinfo": 2, "set": 1, "get": 1})
    # the server itself answered the errors: the proxy forwarded the commands (or, on the pool,
    # each shared connection's probes)
    err_after = _errorstats(obs)
    probes = _own(proxy)
    refused = (1 + (0 if server_has_setinfo else 2) if not POOLED
               else probes.get("client|maint_notifications", 0) + (0 if server_has_setinfo else probes.get("client|setinfo", 0)))
    assert err_after.get("ERR", 0) - err_before.get("ERR", 0) == refused
    delta = commandstats_delta(before, commandstats(obs))
    delta["info"] = delta.get("info", 0) - 2  # the two errorstats reads
    delta = {k: v for k, v in delta.items() if v}
    assert "client|maint_notifications" not in delta and ("client|setinfo" in delta) is server_has_setinfo
    left_out = _upstream_matches(proxy, delta, known)
    if POOLED:
        assert left_out == {cmd: n for cmd, n in probes.items() if cmd not in known}
    else:
        assert left_out == ({"client|maint_notifications": 1} if server_has_setinfo
                            else {"client|maint_notifications": 1, "client|setinfo": 2})


def test_assert_counts_match_only_leaves_out_what_the_server_does_not_know():
    known = {"get", "set", "client", "client|setname"}
    # equal on every known name; the rest is left out and returned
    assert assert_counts_match({"get": 2, "client|setinfo": 1, "unknown": 3}, {"get": 2}, known) == {
        "client|setinfo": 1,
        "unknown": 3,
    }
    assert assert_counts_match({}, {}, known) == {}
    bad = [
        ({"get": 2}, {"get": 1}),  # a known name differs
        ({"get": 1}, {"get": 1, "set": 1}),  # the server counted something the proxy did not
        ({"get": 1, "set": 1}, {"get": 1}),  # and the other way round
        ({"client|setinfo": 1}, {"client|setinfo": 1}),  # the server counts a name it does not list
        ({"unknown": 1}, {"unknown": 1}),
        ({"nosuch|thing": 1}, {}),  # neither the server nor the proxy's table knows it
    ]
    for proxy_counts, server_delta in bad:
        with pytest.raises(AssertionError) as exc:
            assert_counts_match(proxy_counts, server_delta, known)
        assert "proxy=" in str(exc.value) or "does not list" in str(exc.value)
    with pytest.raises(AssertionError):
        assert_counts_match({"unknown": 1}, {}, known | {"unknown"})
