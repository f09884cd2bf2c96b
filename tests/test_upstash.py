"""Upstash-readiness against real components: redis-server with TLS / requirepass / ACL users, the
proxy as a subprocess, redis-py and a Celery worker as clients. Loopback only.

Every secret used here is distinctive, and everything the proxy says (log, /metrics, /healthz, error
replies, stderr of failing startups) is scanned for it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import (
    RespError,
    RespSocket,
    assert_counts_match,
    commandstats,
    commandstats_delta,
    eventually,
    free_port,
    server_known_commands,
)

SECRET = "S3cr3t-T0k3n-xyz"  # the upstream password / token
ALICE_PW = "Al1ce-Pr0xy-Pw-k4"  # proxy user passwords
DEFAULT_PW = "D3fault-Pr0xy-Pw-m2"
WRONG_PW = "Wr0ng-Guess-Pw-j8"  # what an attacker tries: must not be logged either
ALL_SECRETS = (SECRET, ALICE_PW, DEFAULT_PW, WRONG_PW)

QUOTA_MSG = (
    "ERR max requests limit exceeded. Limit: 500000, Usage: 500000. See "
    "https://upstash.com/docs/redis/troubleshooting/max_requests_limit for details"
)
DAILY_MSG = (
    "ERR max daily request limit exceeded. Limit: 10000, Usage: 10000. See "
    "https://upstash.com/docs/redis/troubleshooting/max_requests_limit for details"
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def assert_no_secrets(*texts: str) -> None:
    for t in texts:
        for s in ALL_SECRETS:
            assert s not in t, f"secret {s!r} leaked in: ...{t[max(0, t.find(s) - 200): t.find(s) + 50]!r}"


def scan(proxy, *extra: str) -> None:
    """The proxy's log, metrics and health output, plus anything else captured: no secrets."""
    status, body = proxy.healthz()
    assert_no_secrets(proxy.log_text(), proxy.metrics_text(), body, *extra)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


def counts(proxy, name="respmeter_commands_total", by=("client", "command", "outcome")) -> dict:
    return {k: int(v) for k, v in proxy.metric_sum(name, by=by).items() if v}


def upstream_by_command(proxy) -> dict[str, int]:
    return {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}


def assert_upstream_matches(proxy, delta: dict[str, int], known) -> dict[str, int]:
    """respmeter_upstream_commands_total by command == INFO commandstats delta, for every command the
    server knows (``known``: :func:`support.server_known_commands`, read before the baseline); the
    names left out are ``unknown`` and e.g. redis-py's ``client|setinfo``, which Redis 7.0 rejects."""
    up = upstream_by_command(proxy)
    assert_counts_match(up, delta, known)
    return up


def run_cli(*args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=support.REPO_ROOT,
        env=e,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tls_upstream_args(tls) -> list[str]:
    return ["--upstream-ca", str(tls.ca_cert)]


def wait_closed(sock: RespSocket, timeout: float = 5.0) -> bool:
    return sock.closed_by_peer(timeout)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory) -> Path:
    """A --users file whose hashes come from `python -m proxy hash-password --stdin`."""
    d = tmp_path_factory.mktemp("users")

    def h(pw: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "proxy", "hash-password", "--stdin"],
            cwd=support.REPO_ROOT, input=pw + "\n", capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 0, r.stderr
        out = r.stdout.strip()
        assert pw not in out and out.startswith("scrypt$")
        return out

    path = d / "users.toml"
    path.write_text(
        f'[users.alice]\npassword_hash = "{h(ALICE_PW)}"\nlabel = "billing"\n\n'
        f'[users.default]\npassword_hash = "{h(DEFAULT_PW)}"\nlabel = "ops"\n'
    )
    return path


# ---------------------------------------------------------------------------------------------
# 1. upstream TLS
# ---------------------------------------------------------------------------------------------


def test_tls_upstream_private_ca_and_masked_url(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET)
    proxy = proxy_factory(server.url_with_auth("default", SECRET), tls_upstream_args(tls_material))
    r = proxy.client()
    assert r.ping()
    r.set("k", "v")
    assert r.get("k") == b"v"
    assert proxy.healthz()[0] == 200
    log = proxy.log_text()
    assert f"rediss://default:****@127.0.0.1:{server.port}" in log
    scan(proxy)


def test_upstream_pool_over_tls_with_a_password(tls_material, redis_factory, proxy_factory):
    """The Upstash shape with --upstream-pool 2 (TLS and a password upstream): 200 short-lived
    clients (connect, GET, close), 10 at a time, cost the server at most 2 TLS connections, exactly
    200 GETs and no AUTH but the shared connections' own; what the proxy bills is what the server
    ran, and the password is never printed."""
    server = redis_factory(tls=tls_material, password=SECRET)
    obs = server.client()
    obs.set("k", "v")
    known = server_known_commands(obs)
    proxy = proxy_factory(server.url_with_auth("default", SECRET),
                          [*tls_upstream_args(tls_material), "--upstream-pool", "2"])
    time.sleep(0.3)  # (its start-up health probe)
    conns0 = obs.info("stats")["total_connections_received"]
    billed0 = upstream_by_command(proxy)
    before = commandstats(obs)

    support.short_lived_gets(proxy, 10, 20)
    delta = commandstats_delta(before, commandstats(obs))
    assert obs.info("stats")["total_connections_received"] - conns0 <= 2
    assert delta.get("get") == 200, delta
    assert delta.get("auth", 0) <= 2 and delta.get("hello", 0) <= 2, delta  # (each shared connection's own)
    billed = commandstats_delta(billed0, upstream_by_command(proxy))
    assert_counts_match(billed, delta, known)
    scan(proxy)


def test_tls_verifies_against_system_store_by_default(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material)
    # no --upstream-ca: the test CA is not in the system store, so the upstream is refused...
    proxy = proxy_factory(server.url)
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        r = s.call("PING")
        assert isinstance(r, RespError), r
        assert r.startswith("ERR upstream TLS: certificate verify failed: "), r
        assert wait_closed(s)
    # ...and the system store is what is used: point OpenSSL's default CA file at the test CA
    proxy2 = proxy_factory(server.url, env={"SSL_CERT_FILE": str(tls_material.ca_cert)})
    assert proxy2.client().ping()


@pytest.mark.parametrize("case", ["wrong_ca", "hostname_mismatch"])
def test_tls_verification_failures_are_clear_errors(case, tls_material, redis_factory, proxy_factory):
    if case == "wrong_ca":
        server = redis_factory(tls=tls_material, password=SECRET)
        ca = tls_material.wrong_ca_cert
    else:  # the server presents a certificate for another name, signed by the right CA
        server = redis_factory(tls=tls_material, password=SECRET,
                               server_cert=tls_material.mismatch_server_cert,
                               server_key=tls_material.mismatch_server_key)
        ca = tls_material.ca_cert
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--upstream-ca", str(ca)])
    t0 = time.monotonic()
    r = ""
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        # Whether this PING gets its error reply is racy (see the next test, which makes it
        # deterministic); here: no hang, and if a reply comes, it is the clear one.
        try:
            r = s.call("PING")
        except ConnectionError:
            pass
        else:
            assert isinstance(r, RespError), r
            assert r.startswith("ERR upstream TLS: certificate verify failed: "), r
            if case == "hostname_mismatch":
                assert "mismatch" in r.lower() and "127.0.0.1" in r, r
            assert wait_closed(s)
    assert time.monotonic() - t0 < 5
    status, body = proxy.healthz()
    assert status == 503, body
    assert "certificate verify failed" in body, body
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("tls", 0) >= 1
    scan(proxy, r)


@pytest.mark.parametrize("case", ["wrong_ca", "hostname_mismatch"])
def test_tls_failure_reaches_a_client_that_speaks_late(case, tls_material, redis_factory, proxy_factory):
    """The proxy connects upstream as soon as a client connects; when the TLS handshake fails before
    the client's first command arrives (a redis-py pool connecting, a client that waits), that client
    must still get the error reply, not a bare disconnect."""
    if case == "wrong_ca":
        server = redis_factory(tls=tls_material)
        ca = tls_material.wrong_ca_cert
    else:
        server = redis_factory(tls=tls_material, server_cert=tls_material.mismatch_server_cert,
                               server_key=tls_material.mismatch_server_key)
        ca = tls_material.ca_cert
    proxy = proxy_factory(server.url, ["--upstream-ca", str(ca)])
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        time.sleep(0.5)  # the upstream handshake has failed by now
        try:
            r = s.call("PING")
        except ConnectionError:
            pytest.fail("upstream TLS failure: the client was disconnected without an error reply")
        assert isinstance(r, RespError) and r.startswith("ERR upstream TLS: certificate verify failed: "), r
        if case == "hostname_mismatch":
            assert "mismatch" in r.lower() and "127.0.0.1" in r, r
    # redis-py (which connects, then sends its handshake) sees the error too
    with pytest.raises(redis.exceptions.RedisError) as ei:
        proxy.client().ping()
    assert "certificate verify failed" in str(ei.value), repr(ei.value)


class SniRecorder:
    """A TLS server that records the SNI name each client sends and answers +PONG to anything."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.names: list[str | None] = []
        self.ctx.sni_callback = lambda sslobj, name, ctx: self.names.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                raw, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            conn = self.ctx.wrap_socket(raw, server_side=True)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                n = len(re.findall(rb"(?:^|\n)\*", data))
                conn.sendall(b"+PONG\r\n" * n)
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def close(self) -> None:
        self.stop = True
        self.sock.close()


def test_tls_sends_sni_and_checks_dns_names(tls_material, proxy_factory):
    good = SniRecorder(tls_material.server_cert, tls_material.server_key)
    bad = SniRecorder(tls_material.mismatch_server_cert, tls_material.mismatch_server_key)
    try:
        proxy = proxy_factory(f"rediss://localhost:{good.port}", tls_upstream_args(tls_material))
        with RespSocket(proxy.host, proxy.port) as s:
            assert s.call("PING") == b"PONG"
        assert "localhost" in good.names, good.names
        proxy2 = proxy_factory(f"rediss://localhost:{bad.port}", tls_upstream_args(tls_material))
        with RespSocket(proxy2.host, proxy2.port) as s:
            r = s.call("PING")
            assert isinstance(r, RespError) and r.startswith("ERR upstream TLS: certificate verify failed: "), r
            assert "localhost" in r and "mismatch" in r.lower(), r
        assert "localhost" in bad.names  # SNI is sent even when the name then fails to verify
    finally:
        good.close()
        bad.close()


def test_tls_client_certificate(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, tls_auth_clients="yes", password=SECRET)
    url = server.url_with_auth("default", SECRET)
    proxy = proxy_factory(url, [*tls_upstream_args(tls_material),
                                "--upstream-cert", str(tls_material.client_cert),
                                "--upstream-key", str(tls_material.client_key)])
    r = proxy.client()
    r.set("a", "1")
    assert r.get("a") == b"1"
    assert proxy.healthz()[0] == 200
    scan(proxy)


def test_tls_missing_client_certificate_is_a_clear_error(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, tls_auth_clients="yes", password=SECRET)
    proxy = proxy_factory(server.url_with_auth("default", SECRET), tls_upstream_args(tls_material))
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        try:
            r = s.call("PING")
        except ConnectionError:
            pytest.fail("missing client certificate: the proxy dropped the client with no error reply")
        assert isinstance(r, RespError), r
        assert r.startswith("ERR upstream TLS"), r
        assert "certificate" in r.lower(), r
        assert wait_closed(s)
    status, body = proxy.healthz()
    assert status == 503, body
    assert "certificate" in body.lower(), body
    scan(proxy, r)


def test_tls_insecure_works_and_warns(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET,
                           server_cert=tls_material.mismatch_server_cert,
                           server_key=tls_material.mismatch_server_key)
    proxy = proxy_factory(server.url_with_auth("default", SECRET),
                          ["--upstream-ca", str(tls_material.wrong_ca_cert), "--upstream-tls-insecure"])
    r = proxy.client()
    r.set("x", "1")
    assert r.get("x") == b"1"
    warnings = [ln for ln in proxy.log_text().splitlines() if "WARNING" in ln and "--upstream-tls-insecure" in ln]
    assert warnings, proxy.log_text()
    assert "NOT verified" in warnings[0]
    scan(proxy)


# ---------------------------------------------------------------------------------------------
# 2. credential injection
# ---------------------------------------------------------------------------------------------


def _exercise(proxy, protocol: int) -> None:
    r = proxy.client(protocol=protocol)
    assert r.ping()
    r.set(f"p{protocol}", "1")
    assert r.incr(f"p{protocol}") == 2
    assert _s(r.acl_whoami()) == "default"
    p = r.pipeline(transaction=True)
    p.set("t", "x").get("t")
    assert p.execute() == [True, b"x"]
    r.close()


def test_url_credentials_resp2_and_resp3_counted_exactly(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET)
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    proxy = proxy_factory(server.url_with_auth("default", SECRET), tls_upstream_args(tls_material))
    _exercise(proxy, 2)
    after_resp2 = commandstats_delta(before, commandstats(obs))
    assert after_resp2.get("auth") == 1  # one AUTH from the proxy for the RESP2 connection
    _exercise(proxy, 3)
    delta = commandstats_delta(before, commandstats(obs))
    delta["info"] = delta.get("info", 0) - 1  # the middle read
    delta = {k: v for k, v in delta.items() if v}
    # RESP3: the client's HELLO carried the credentials, no separate AUTH
    assert delta.get("auth") == 1, delta
    assert delta.get("hello") == 1, delta
    assert_upstream_matches(proxy, delta, known)
    mine = counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    assert mine == {**{k: v for k, v in mine.items() if k[0] != "respmeter"}, ("respmeter", "auth"): 1}
    assert ("anonymous", "auth") not in mine
    scan(proxy)


@pytest.mark.parametrize("source", ["env", "file"])
def test_password_from_env_or_file(source, tls_material, redis_factory, proxy_factory, tmp_path):
    server = redis_factory(tls=tls_material, password=SECRET)
    args = tls_upstream_args(tls_material)
    env = {}
    if source == "env":
        env["RESPMETER_UPSTREAM_PASSWORD"] = SECRET
    else:
        f = tmp_path / "pw"
        f.write_text(SECRET + "\n")
        args += ["--upstream-password-file", str(f)]
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    proxy = proxy_factory(server.url, args, env=env)
    _exercise(proxy, 2)
    _exercise(proxy, 3)
    delta = commandstats_delta(before, commandstats(obs))
    assert_upstream_matches(proxy, delta, known)
    assert f"rediss://:****@127.0.0.1:{server.port}" in proxy.log_text() or \
        f"rediss://127.0.0.1:{server.port}" in proxy.log_text()
    scan(proxy)


def test_client_credentials_never_forwarded(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET)
    obs = server.client()
    obs.acl_log_reset()
    known = server_known_commands(obs)
    before = commandstats(obs)
    proxy = proxy_factory(server.url_with_auth("default", SECRET), tls_upstream_args(tls_material))
    # redis-py sends AUTH bob <pw> (RESP2) / HELLO 3 AUTH bob <pw> (RESP3) with its own credentials
    for proto in (2, 3):
        r = proxy.client(protocol=proto, username="bob", password=WRONG_PW)
        assert r.ping()
        assert _s(r.acl_whoami()) == "default"
        r.close()
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("AUTH", WRONG_PW) == b"OK"
        hello = s.call("HELLO", "3", "AUTH", "carol", WRONG_PW, "SETNAME", "svc-a")
        assert isinstance(hello, dict) and hello[b"proto"] == 3, hello
        assert s.call("CLIENT", "GETNAME") == b"svc-a"  # SETNAME inside HELLO took effect
        assert s.call("SET", "z", "1") == b"OK"
    # the server never saw a failed authentication (bob / carol do not exist there)
    assert obs.acl_log() == []
    delta = commandstats_delta(before, commandstats(obs))
    delta["acl|log"] = delta.get("acl|log", 0) - 1
    delta = {k: v for k, v in delta.items() if v}
    up = assert_upstream_matches(proxy, delta, known)
    auth_by_client = {k: v for k, v in proxy.metric_sum("respmeter_upstream_commands_total",
                                                          by=("client", "command")).items()
                      if k[1] == "auth" and v}
    assert set(auth_by_client) == {("respmeter", "auth")}
    assert delta.get("auth", 0) == up.get("auth", 0) == 1  # only the RESP2 redis-py connection
    ok_local = counts(proxy)
    assert sum(v for (c, cmd, o), v in ok_local.items() if cmd == "auth" and o == "local") == 2
    scan(proxy)


def test_acl_user(tls_material, redis_factory, proxy_factory):
    server = redis_factory(
        ["--user", "app", "on", f">{SECRET}", "~*", "&*", "+@all", "--user", "default", "off"],
        tls=tls_material, username="app", password=SECRET,
    )
    obs = server.client()
    assert _s(obs.acl_whoami()) == "app"
    known = server_known_commands(obs)
    before = commandstats(obs)
    proxy = proxy_factory(f"rediss://app:{SECRET}@127.0.0.1:{server.port}", tls_upstream_args(tls_material))
    for proto in (2, 3):
        r = proxy.client(protocol=proto)
        assert _s(r.acl_whoami()) == "app"
        r.set(f"acl{proto}", "v")
        assert r.get(f"acl{proto}") in (b"v", "v")
        r.close()
    delta = commandstats_delta(before, commandstats(obs))
    assert delta.get("auth") == 1 and delta.get("hello") == 1, delta
    assert_upstream_matches(proxy, delta, known)
    assert f"rediss://app:****@127.0.0.1:{server.port}" in proxy.log_text()
    scan(proxy)


@pytest.mark.parametrize("pool", [0, 2])
def test_wrong_upstream_password(pool, redis_factory, proxy_factory):
    """Told the same with or without the upstream pool: the client's error, the log, the metric
    (kind auth) and /healthz."""
    server = redis_factory(password="the-real-one-123")
    proxy = proxy_factory(f"redis://default:{SECRET}@127.0.0.1:{server.port}", ["--upstream-pool", str(pool)])
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        r = s.call("GET", "a")
    assert r == RespError("ERR upstream rejected the proxy's credentials"), r
    log = proxy.log_text()
    assert "rejected the proxy's credentials" in log
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("auth") == 1
    scan(proxy, r)
    status, body = proxy.healthz()
    assert status == 503 and "credentials" in body, (status, body)


@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("pause", [0, 0.3])
def test_a_server_connection_limit_is_not_a_credentials_error(pool, pause, redis_factory, proxy_factory):
    """A server at its connection limit (Redis's maxclients; Upstash answers 'max concurrent
    connections exceeded') refuses the proxy's connection with an error (Redis writes it as soon as
    it accepts, before the proxy's AUTH; with ``pause`` the client's first command comes well after
    it): the client gets the server's own words, as it would straight to the server, and the
    operator is told the server refused the connection (not that the password is wrong). Once
    connections are free again, the same proxy serves."""
    server = redis_factory(["--maxclients", "2"], password="the-real-one-123")
    held = [server.client() for _ in range(2)]
    for h in held:
        assert h.ping()
    proxy = proxy_factory(server.url_with_auth("default", "the-real-one-123"), ["--upstream-pool", str(pool)])
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        time.sleep(pause)
        r = s.call("GET", "a")
    assert r == RespError("ERR max number of clients reached"), r
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("rejected", 0) >= 1
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("auth", 0) == 0
    status, body = proxy.healthz()
    assert status == 503 and "refused the connection" in body and "credentials" not in body, (status, body)
    assert "rejected the proxy's credentials" not in proxy.log_text()
    for h in held:
        h.close()
    time.sleep(0.3)
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        assert s.call("SET", "a", "1") == b"OK" and s.call("GET", "a") == b"1"
    assert eventually(lambda: proxy.healthz()[0] == 200)
    scan(proxy)


def test_wrong_upstream_password_resp3_client(redis_factory, proxy_factory):
    """A RESP3 client's first HELLO carries the proxy's credentials: when the upstream rejects them,
    the operator must learn it just as with the separate AUTH (log, metric)."""
    server = redis_factory(password="the-real-one-123")
    proxy = proxy_factory(f"redis://default:{SECRET}@127.0.0.1:{server.port}")
    with RespSocket(proxy.host, proxy.port, timeout=10) as s:
        r = s.call("HELLO", "3")
        # the client sent no password: it is told whose credentials were refused (the server's
        # WRONGPASS would read as if its own were wrong), as on the separate AUTH and with a pool
        assert r == RespError("ERR upstream rejected the proxy's credentials"), r
    assert_no_secrets(r)
    # the reply is passed on before it is looked at: the log line follows within moments
    log = eventually(lambda: "rejected the proxy's credentials" in proxy.log_text() and proxy.log_text())
    assert "rejected the proxy's credentials" in (log or proxy.log_text())
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("auth") == 1
    scan(proxy, r)
    status, body = proxy.healthz()
    assert status == 503 and "credentials" in body, (status, body)


@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("protocol", [2, 3])
def test_wrong_upstream_password_redis_py(protocol, pool, redis_factory, proxy_factory):
    """What a redis-py user sees when the proxy's upstream credentials are wrong: the proxy's
    error on their command, in both protocols, with and without the pool. redis-py ignores the
    errors to its CLIENT SETINFO at connect: the connection must still be there for its command
    (it used to be closed after them, and RESP2 users saw only 'Connection reset by peer');
    RESP3's HELLO used to give the server's WRONGPASS, as if the client's password were wrong."""
    server = redis_factory(password="the-real-one-123")
    proxy = proxy_factory(f"redis://default:{SECRET}@127.0.0.1:{server.port}", ["--upstream-pool", str(pool)])
    client = redis.Redis(host=proxy.host, port=proxy.port, protocol=protocol, socket_timeout=10)
    for _ in range(2):  # (and again, on a new connection)
        with pytest.raises(redis.ResponseError, match="upstream rejected the proxy's credentials"):
            client.get("a")
    client.close()
    assert server.client().info("commandstats").get("cmdstat_get") is None  # nothing ran


# ---------------------------------------------------------------------------------------------
# 3. client authentication
# ---------------------------------------------------------------------------------------------


def _client_list_others(obs) -> list[dict]:
    me = obs.client_id()
    return [c for c in obs.client_list() if int(c["id"]) != me]


def test_unauthenticated_clients_send_nothing_upstream(users_file, redis_factory, proxy_factory):
    server = redis_factory(password=SECRET)
    obs = server.client()
    obs.ping()
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--users", str(users_file)])
    processed0 = obs.info("stats")["total_commands_processed"]
    before = commandstats(obs)
    with RespSocket(proxy.host, proxy.port) as s:
        for cmd in (("GET", "a"), ("SET", "a", "1"), ("PING",), ("CLIENT", "SETNAME", "x"),
                    ("SUBSCRIBE", "c"), ("MULTI",), ("NOSUCHCMD",)):
            assert s.call(*cmd) == RespError("NOAUTH Authentication required."), cmd
        r = s.call("HELLO", "3")
        assert isinstance(r, RespError) and r.startswith("NOAUTH"), r
        r = s.call("AUTH", "alice", WRONG_PW)
        assert isinstance(r, RespError) and r.startswith("WRONGPASS"), r
        r = s.call("AUTH", WRONG_PW)
        assert isinstance(r, RespError) and r.startswith("WRONGPASS"), r
        r = s.call("HELLO", "3", "AUTH", "alice", WRONG_PW)
        assert isinstance(r, RespError) and r.startswith("WRONGPASS"), r
        assert s.call("GET", "a") == RespError("NOAUTH Authentication required.")
        assert commandstats_delta(before, commandstats(obs)) == {}
        processed1 = obs.info("stats")["total_commands_processed"]
        assert processed1 - processed0 == 3  # only the observer's own three INFO
        others = _client_list_others(obs)
        assert all(c["cmd"] == "NULL" for c in others), others  # connected, but never sent a thing
        # now authenticate: commands flow, labelled with the user's label
        assert s.call("AUTH", "alice", ALICE_PW) == b"OK"
        assert s.call("SET", "a", "1") == b"OK"
        assert s.call("GET", "a") == b"1"
    c = counts(proxy)
    assert c[("billing", "set", "ok")] == 1 and c[("billing", "get", "ok")] == 1
    assert c[("anonymous", "get", "rejected")] == 2
    scan(proxy)


def test_authentication_forms_and_labels(users_file, redis_factory, proxy_factory):
    server = redis_factory(password=SECRET)
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--users", str(users_file)])
    with RespSocket(proxy.host, proxy.port) as s:  # AUTH pass: user default
        assert s.call("AUTH", DEFAULT_PW) == b"OK"
        assert s.call("INCR", "n") == 1
    r2 = proxy.client(protocol=2, username="alice", password=ALICE_PW)  # AUTH user pass
    assert r2.incr("n") == 2
    r3 = proxy.client(protocol=3, username="alice", password=ALICE_PW)  # HELLO 3 AUTH user pass
    assert r3.incr("n") == 3
    with RespSocket(proxy.host, proxy.port) as s:
        hello = s.call("HELLO", "3", "AUTH", "alice", ALICE_PW, "SETNAME", "w1")
        assert isinstance(hello, dict) and hello[b"proto"] == 3
        assert s.call("CLIENT", "GETNAME") == b"w1"
        assert s.call("INCR", "n") == 4
    with pytest.raises(redis.exceptions.AuthenticationError):
        proxy.client(protocol=3, username="alice", password=WRONG_PW).ping()
    c = counts(proxy)
    assert c[("ops", "incr", "ok")] == 1
    assert c[("billing", "incr", "ok")] + c[("billing", "incrby", "ok")] == 3  # redis-py: INCRBY
    scan(proxy)


def test_repeated_failures_are_slowed_down(users_file, redis_factory, proxy_factory):
    """Each source address has a failed-login budget: 10 new wrong passwords are answered at once,
    the next waits for the budget (one more every 5 s) before any hashing, and the same wrong
    password again costs nothing. Per address: another one still logs in at once."""
    server = redis_factory(password=SECRET)
    obs = server.client()
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--users", str(users_file)])
    before = commandstats(obs)
    times = []
    with RespSocket(proxy.host, proxy.port, timeout=8) as s:
        for i in range(10):
            t0 = time.monotonic()
            r = s.call("AUTH", "alice", f"{WRONG_PW}-{i}")
            times.append(time.monotonic() - t0)
            assert isinstance(r, RespError) and r.startswith("WRONGPASS"), r
        assert max(times) < 1.5, times
        t0 = time.monotonic()  # a password already known to be wrong: answered at once, for free
        r = s.call("AUTH", "alice", f"{WRONG_PW}-0")
        assert isinstance(r, RespError) and r.startswith("WRONGPASS") and time.monotonic() - t0 < 0.2, r
        s.command("AUTH", "alice", f"{WRONG_PW}-10")  # the 11th new one waits for the budget
        s.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            s.read()
    # nothing reached the server meanwhile, and a correct password from another address is
    # accepted at once
    assert commandstats_delta(before, commandstats(obs)) == {}
    with socket.create_connection((proxy.host, proxy.port), timeout=5, source_address=("127.0.0.2", 0)) as raw:
        raw.sendall(support.encode_resp("AUTH", "alice", ALICE_PW))
        assert raw.recv(64) == b"+OK\r\n"
    scan(proxy)


def test_identity_order(users_file, redis_factory, proxy_factory):
    server = redis_factory()
    celery_port = free_port()
    proxy = proxy_factory(server, ["--listen", f"celery=127.0.0.1:{celery_port}"])
    with RespSocket(proxy.host, proxy.port) as s:
        s.call("GET", "k")  # anonymous
        s.call("CLIENT", "SETNAME", "web")
        s.call("GET", "k")  # web
    with RespSocket(proxy.host, celery_port) as s:
        s.call("GET", "k")  # celery
        s.call("CLIENT", "SETNAME", "web")
        s.call("GET", "k")  # still celery: the listener beats SETNAME
    c = counts(proxy)
    assert c[("anonymous", "get", "ok")] == 1
    assert c[("web", "get", "ok")] == 1
    assert c[("celery", "get", "ok")] == 2
    # with users: the user's label beats the listener
    celery_port2 = free_port()
    proxy2 = proxy_factory(server, ["--users", str(users_file), "--listen", f"celery=127.0.0.1:{celery_port2}"])
    with RespSocket(proxy2.host, celery_port2) as s:
        assert s.call("AUTH", "alice", ALICE_PW) == b"OK"
        s.call("CLIENT", "SETNAME", "web")
        s.call("GET", "k")
    c2 = counts(proxy2)
    assert c2[("billing", "get", "ok")] == 1
    assert c2[("billing", "client|setname", "ok")] == 1
    scan(proxy2)


# ---------------------------------------------------------------------------------------------
# 4. safe by default, downstream TLS, secrets
# ---------------------------------------------------------------------------------------------


def test_public_listen_needs_users_or_explicit_opt_out(redis_factory, proxy_factory, users_file):
    server = redis_factory(password=SECRET)
    port = free_port("0.0.0.0")
    r = run_cli("run", "--listen", f"0.0.0.0:{port}", "--upstream", server.url_with_auth("default", SECRET),
                "--admin", f"127.0.0.1:{free_port()}", timeout=20)
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0" in r.stderr, r.stderr
    assert "--users" in r.stderr and "--allow-unauthenticated" in r.stderr
    assert_no_secrets(r.stdout, r.stderr)
    # with --allow-unauthenticated it starts
    p2 = free_port("0.0.0.0")
    proxy = proxy_factory(server.url_with_auth("default", SECRET),
                          ["--listen", f"0.0.0.0:{p2}", "--allow-unauthenticated"])
    with RespSocket("127.0.0.1", p2) as s:
        assert s.call("PING") == b"PONG"
    # with --users it starts too (clients must authenticate)
    p3 = free_port("0.0.0.0")
    proxy3 = proxy_factory(server.url_with_auth("default", SECRET),
                           ["--listen", f"0.0.0.0:{p3}", "--users", str(users_file)])
    with RespSocket("127.0.0.1", p3) as s:
        assert s.call("PING") == RespError("NOAUTH Authentication required.")
    scan(proxy)
    scan(proxy3)


def test_failing_startups_explain_and_never_leak(tls_material, redis_factory, tmp_path):
    server = redis_factory(tls=tls_material, password=SECRET)
    url = server.url_with_auth("default", SECRET)
    admin = ["--admin", f"127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{free_port()}"]
    cases = {
        "bad --upstream-ca": (["--upstream", url, "--upstream-ca", str(tmp_path / "nope.crt")], {}, "upstream"),
        "cert without key": (["--upstream", url, "--upstream-cert", str(tls_material.client_cert)], {}, "--upstream-key"),
        "two password sources": (["--upstream", url], {"RESPMETER_UPSTREAM_PASSWORD": SECRET}, "more than once"),
        "empty password file": (["--upstream", server.url, "--upstream-password-file", str(tmp_path / "missing")], {}, "--upstream-password-file"),
        "bad users file": (["--upstream", url, "--users", str(tmp_path / "nousers.toml")], {}, "--users"),
        "bad port in URL": (["--upstream", f"rediss://default:{SECRET}@127.0.0.1:99999"], {}, "port"),
        "ca on plain redis": ([ "--upstream", f"redis://default:{SECRET}@127.0.0.1:1", "--upstream-ca", str(tls_material.ca_cert)], {}, "rediss://"),
    }
    for what, (args, env, expect) in cases.items():
        r = run_cli("run", *admin, *args, env=env, timeout=20)
        assert r.returncode != 0, (what, r.stderr)
        assert expect in r.stderr, (what, r.stderr)
        assert_no_secrets(r.stdout, r.stderr)


def test_downstream_tls(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET)
    proxy = proxy_factory(server.url_with_auth("default", SECRET),
                          [*tls_upstream_args(tls_material), "--tls-cert", str(tls_material.server_cert),
                           "--tls-key", str(tls_material.server_key)])
    r = proxy.client(ssl=True, ssl_ca_certs=str(tls_material.ca_cert), ssl_cert_reqs="required",
                     ssl_check_hostname=True)
    r.set("tls", "yes")
    assert r.get("tls") == b"yes"
    r3 = proxy.client(ssl=True, ssl_ca_certs=str(tls_material.ca_cert), protocol=3)
    assert r3.get("tls") == b"yes"
    # a plaintext client is not served
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
        raw.sendall(b"*1\r\n$4\r\nPING\r\n")
        try:
            data = raw.recv(100)
        except (ConnectionResetError, socket.timeout):
            data = b""
        assert b"PONG" not in data
    scan(proxy)


# ---------------------------------------------------------------------------------------------
# 5. upstream quota errors
# ---------------------------------------------------------------------------------------------


def test_quota_errors_counted_and_reported(redis_factory, proxy_factory):
    server = redis_factory(password=SECRET)
    proxy = proxy_factory(server.url_with_auth("default", SECRET))
    assert proxy.healthz()[0] == 200
    r = proxy.client()
    with pytest.raises(redis.exceptions.ResponseError) as ei:
        r.eval(f"return redis.error_reply('{QUOTA_MSG}')", 0)
    assert "max requests limit exceeded" in str(ei.value)
    assert proxy.metric_sum("respmeter_upstream_quota_exceeded_total", by=()) == {(): 1.0}
    status, body = proxy.healthz()
    assert status == 503, body
    assert "quota" in body and "max requests limit exceeded" in body, body
    with pytest.raises(redis.exceptions.ResponseError):
        r.eval(f"return redis.error_reply('{DAILY_MSG}')", 0)
    assert proxy.metric_sum("respmeter_upstream_quota_exceeded_total", by=()) == {(): 2.0}
    status, body = proxy.healthz()
    assert status == 503 and "max daily request limit exceeded" in body, body
    # an ordinary error is not a quota error
    with pytest.raises(redis.exceptions.ResponseError):
        r.eval("return redis.error_reply('ERR max requests are fine')", 0)
    assert proxy.metric_sum("respmeter_upstream_quota_exceeded_total", by=()) == {(): 2.0}
    scan(proxy)


# ---------------------------------------------------------------------------------------------
# 6. acceptance end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def upstash_like(tls_material, redis_factory, proxy_factory):
    server = redis_factory(tls=tls_material, password=SECRET)
    proxy = proxy_factory(f"rediss://default:{SECRET}@127.0.0.1:{server.port}",
                          ["--upstream-ca", str(tls_material.ca_cert)])
    return server, proxy


@pytest.mark.parametrize("protocol", [2, 3])
def test_acceptance_redis_py(protocol, upstash_like):
    server, proxy = upstash_like
    obs = server.client()
    known = server_known_commands(obs)
    before = commandstats(obs)
    r = proxy.client(protocol=protocol, decode_responses=True)
    r.set("a", "1")
    assert r.incrby("a", 4) == 5
    r.hset("h", mapping={"x": "1", "y": "2"})
    assert r.hgetall("h") == {"x": "1", "y": "2"}
    r.rpush("l", "a", "b", "c")
    assert r.lrange("l", 0, -1) == ["a", "b", "c"]
    p = r.pipeline(transaction=True)
    p.incr("c").incr("c").get("c")
    assert p.execute() == [1, 2, "2"]
    p = r.pipeline(transaction=False)
    for i in range(50):
        p.set(f"k{i}", i)
    assert all(p.execute())
    assert list(r.brpop(["l"], timeout=1)) == ["l", "c"]
    # pub/sub
    sub = proxy.client(protocol=protocol, decode_responses=True).pubsub()
    sub.subscribe("news")
    sub.psubscribe("n*")
    deadline = time.monotonic() + 5
    confirms = 0
    while confirms < 2 and time.monotonic() < deadline:
        m = sub.get_message(timeout=0.5)
        if m and m["type"] in ("subscribe", "psubscribe"):
            confirms += 1
    assert confirms == 2
    assert r.publish("news", "hello") == 2
    got = []
    while len(got) < 2 and time.monotonic() < deadline:
        m = sub.get_message(timeout=0.5)
        if m and m["type"] in ("message", "pmessage"):
            got.append((m["type"], m["data"]))
    assert sorted(got) == [("message", "hello"), ("pmessage", "hello")]
    sub.unsubscribe()
    sub.punsubscribe()
    sub.close()
    r.close()
    time.sleep(0.2)  # let the unsubscribe confirmations reach the proxy
    delta = commandstats_delta(before, commandstats(obs))
    assert_upstream_matches(proxy, delta, known)
    if protocol == 3:
        assert "auth" not in delta  # every connection's HELLO carried the credentials
    else:
        assert delta["auth"] == 2  # one per connection, counted under respmeter
    scan(proxy)


CELERY_APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    url = os.environ["UPSTASH_TEST_BROKER"]
    app = Celery("upstash_tasks", broker=url, backend=url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=60,
        broker_transport_options={"visibility_timeout": 60},
    )

    @app.task(name="upstash_tasks.add")
    def add(x, y):
        return x + y
    """
)


@pytest.mark.slow
def test_acceptance_celery(upstash_like, tmp_path):
    from celery import Celery

    server, proxy = upstash_like
    (tmp_path / "upstash_tasks.py").write_text(CELERY_APP)
    broker = f"redis://127.0.0.1:{proxy.port}/0"
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(tmp_path), "UPSTASH_TEST_BROKER": broker, "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "upstash_tasks", "worker", "--pool", "solo",
             "--loglevel", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", "upstash@localhost"],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    support._register(worker)
    app = Celery("client", broker=broker, backend=broker)
    app.conf.broker_connection_retry_on_startup = True
    try:
        deadline = time.monotonic() + 25
        while b"ready." not in log_path.read_bytes():
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        results = [app.send_task("upstash_tasks.add", args=(i, 10)) for i in range(3)]
        assert [res.get(timeout=15) for res in results] == [10, 11, 12]
    finally:
        app.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=5)
        support._unregister(worker)
    wlog = log_path.read_text(errors="replace")
    assert "succeeded" in wlog, wlog
    up = counts(proxy, "respmeter_upstream_commands_total", by=("client", "command"))
    assert up.get(("respmeter", "auth"), 0) >= 2  # every upstream connection was authenticated
    assert any(cmd in ("subscribe", "psubscribe") for (_, cmd) in up), up  # result backend pub/sub
    assert not any(o == "rejected" for (_, _, o) in counts(proxy)), counts(proxy)
    scan(proxy, wlog)
