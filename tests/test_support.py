"""Self-tests of the real-component test infrastructure (tests/support.py)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from_repo = support.REPO_ROOT


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # may be a zombie of an exited child that nobody reaped (not ours here)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------


def test_tls_material_files(tls_material):
    m = tls_material
    for f in (m.ca_cert, m.ca_key, m.server_cert, m.server_key, m.client_cert, m.client_key,
              m.wrong_ca_cert, m.wrong_ca_key, m.wrong_client_cert, m.wrong_client_key,
              m.mismatch_server_cert, m.mismatch_server_key):
        assert f.is_file() and f.stat().st_size > 0, f
    assert b"PRIVATE KEY" in m.server_key.read_bytes()

    server = ssl._ssl._test_decode_cert(str(m.server_cert))  # type: ignore[attr-defined]
    assert ("IP Address", "127.0.0.1") in server["subjectAltName"]
    assert ("DNS", "localhost") in server["subjectAltName"]
    mismatch = ssl._ssl._test_decode_cert(str(m.mismatch_server_cert))  # type: ignore[attr-defined]
    assert mismatch["subjectAltName"] == (("DNS", m.MISMATCH_HOSTNAME),)

    # chains: good leafs verify against the CA, the wrong-CA client does not
    def verify(ca, cert):
        return subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(ca), str(cert)],
                              capture_output=True).returncode

    assert verify(m.ca_cert, m.server_cert) == 0
    assert verify(m.ca_cert, m.client_cert) == 0
    assert verify(m.ca_cert, m.mismatch_server_cert) == 0
    assert verify(m.ca_cert, m.wrong_client_cert) != 0
    assert verify(m.wrong_ca_cert, m.server_cert) != 0
    # Python's ssl accepts the files (cert + key pairs match)
    ctx = ssl.create_default_context(cafile=str(m.ca_cert))
    ctx.load_cert_chain(str(m.client_cert), str(m.client_key))


# ---------------------------------------------------------------------------
# RedisServer
# ---------------------------------------------------------------------------


def test_redis_server_plain(redis_server):
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    c = redis_server.client()
    assert c.ping() is True
    c.set("test_support:plain", "v")
    assert c.get("test_support:plain") == b"v"
    assert c.config_get("save") == {"save": ""}
    assert c.config_get("appendonly") == {"appendonly": "no"}
    assert c.config_get("bind")["bind"] == "127.0.0.1"
    # a client built from the URL reaches the same server
    assert redis.Redis.from_url(redis_server.url).get("test_support:plain") == b"v"
    assert redis_server.port != 6379


def test_redis_server_requirepass(redis_factory):
    srv = redis_factory(password="s3cret pw")
    assert srv.client().ping() is True
    assert srv.url_with_auth() == f"redis://:s3cret%20pw@127.0.0.1:{srv.port}"
    assert redis.Redis.from_url(srv.url_with_auth()).ping() is True
    with pytest.raises(redis.exceptions.AuthenticationError):
        srv.client(password=None).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        srv.client(password="wrong").ping()


def test_redis_server_acl_user(redis_factory):
    srv = redis_factory(
        ["--user", "default", "off",
         "--user", "alice", "on", ">alice-pw", "~app:*", "+@all"],
        username="alice", password="alice-pw",
    )
    c = srv.client()
    assert c.acl_whoami() == "alice"
    c.set("app:x", 1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        c.set("other:x", 1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        srv.client(username=None, password=None).ping()
    assert srv.url_with_auth() == f"redis://alice:alice-pw@127.0.0.1:{srv.port}"


def test_redis_server_extra_args_override(redis_factory):
    srv = redis_factory(["--maxclients", "77", "--appendonly", "no"])
    assert srv.client().config_get("maxclients") == {"maxclients": "77"}


def test_redis_tls_server_auth_only(redis_factory, tls_material):
    srv = redis_factory(tls=tls_material)
    assert srv.url == f"rediss://127.0.0.1:{srv.port}"
    assert srv.client().ping() is True
    # no client certificate needed with --tls-auth-clients no
    assert srv.client(ssl_certfile=None, ssl_keyfile=None).ping() is True
    # the hostname "localhost" is also in the SAN
    assert srv.client(host="localhost").ping() is True
    # rediss:// URL + CA query param works in redis-py
    url = f"{srv.url}?ssl_ca_certs={tls_material.ca_cert}"
    assert redis.Redis.from_url(url).ping() is True
    # wrong CA: certificate verification fails
    with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate verify failed"):
        srv.client(ssl_ca_certs=str(tls_material.wrong_ca_cert)).ping()
    # no CA at all (system store only): also rejected
    with pytest.raises(redis.exceptions.ConnectionError):
        srv.client(ssl_ca_certs=None).ping()
    # verification disabled: works
    assert srv.client(ssl_ca_certs=None, ssl_cert_reqs="none").ping() is True
    # TLS-only: a plaintext client does not get a PONG
    with pytest.raises(redis.exceptions.ConnectionError):
        srv.client(ssl=False, socket_timeout=2).ping()


def test_redis_tls_server_requires_client_cert(redis_factory, tls_material):
    srv = redis_factory(tls=tls_material, tls_auth_clients="yes", password="pw")
    assert srv.client().ping() is True
    with pytest.raises(redis.exceptions.ConnectionError):
        srv.client(ssl_certfile=None, ssl_keyfile=None).ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        srv.client(ssl_certfile=str(tls_material.wrong_client_cert),
                   ssl_keyfile=str(tls_material.wrong_client_key)).ping()


def test_redis_tls_hostname_mismatch(redis_factory, tls_material):
    srv = redis_factory(tls=tls_material,
                        server_cert=tls_material.mismatch_server_cert,
                        server_key=tls_material.mismatch_server_key)
    with pytest.raises(redis.exceptions.ConnectionError, match="(?i)hostname|IP address mismatch"):
        srv.client().ping()
    # chain is fine, only the name is wrong
    assert srv.client(ssl_check_hostname=False).ping() is True


def test_redis_server_stop_kill_restart(tmp_path):
    srv = support.RedisServer(workdir=tmp_path / "r")
    with srv:
        pid, port = srv.pid, srv.port
        assert srv.client().ping()
        assert srv.kill() == -signal.SIGKILL
        assert not _pid_alive(pid)
        assert not support.port_is_open("127.0.0.1", port)
        srv.start()  # restartable (new port)
        assert srv.client().ping()
    assert srv.returncode == 0  # SIGTERM -> clean shutdown
    assert "ready to accept connections" in srv.log_text().lower()


def test_redis_server_retries_on_port_race(tmp_path, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    real = support.free_port
    handed = []

    def fake_free_port(host="127.0.0.1"):
        port = busy_port if not handed else real(host)
        handed.append(port)
        return port

    monkeypatch.setattr(support, "free_port", fake_free_port)
    try:
        with support.RedisServer(workdir=tmp_path) as srv:
            assert handed[0] == busy_port and len(handed) == 2
            assert srv.port != busy_port and srv.client().ping()
    finally:
        busy.close()


def test_redis_server_bad_config_reports_log(tmp_path):
    srv = support.RedisServer(["--no-such-option", "1"], workdir=tmp_path)
    with pytest.raises(support.ProcessStartError, match="no-such-option"):
        srv.start()


def _run_py(code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=timeout,
    )


def _orphan_check(code: str, expect_rc: int) -> None:
    res = _run_py(code)
    assert res.returncode == expect_rc, res.stderr
    pid = int(res.stdout.split()[0])
    try:
        assert _wait_dead(pid), f"redis-server {pid} outlived its parent"
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_children_killed_at_interpreter_exit():
    _orphan_check("""
        import support
        s = support.RedisServer().start()  # never stopped: atexit must kill it
        print(s.pid, flush=True)
    """, 0)


def test_children_die_with_sigkilled_parent():
    if not support._deathsig_prefix():
        pytest.skip("setpriv --pdeathsig unavailable")
    _orphan_check("""
        import os, signal, support
        s = support.RedisServer().start()
        print(s.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, -signal.SIGKILL)


# ---------------------------------------------------------------------------
# commandstats
# ---------------------------------------------------------------------------


def test_parse_commandstats_text():
    text = (
        "# Commandstats\r\n"
        "cmdstat_get:calls=3,usec=10,usec_per_call=3.33,rejected_calls=2,failed_calls=1\r\n"
        "cmdstat_client|setname:calls=1,usec=1,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n"
        "cmdstat_host::calls=1,usec=1,usec_per_call=1.00\r\n"
    )
    assert support.parse_commandstats(text) == {"get": 5, "client|setname": 1, "host:": 1}


def test_commandstats_delta(redis_factory):
    srv = redis_factory()
    observer = srv.client()
    before = support.commandstats(observer)
    assert before.get("hello") == 1  # redis-py 8 handshake (RESP3)
    assert "info" not in before  # the first INFO is not yet counted

    worker = srv.client(protocol=2)
    worker.set("k", "v")
    worker.get("k")
    worker.get("k")
    worker.client_setname("w")
    with pytest.raises(redis.exceptions.ResponseError):
        worker.incr("k")  # failed call: still in calls
    after = support.commandstats(observer)
    assert support.commandstats_delta(before, after) == {
        "set": 1, "get": 2, "client|setname": 1, "incrby": 1,
    }
    # nothing happened in between -> empty delta (only the INFO calls)
    again = support.commandstats(observer)
    assert support.commandstats_delta(after, again) == {}


def test_commandstats_counts_rejected_calls(redis_factory):
    srv = redis_factory(password="pw")
    observer = srv.client()
    before = support.commandstats(observer)
    with socket.create_connection((srv.host, srv.port), timeout=5) as s:
        s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        assert s.recv(100).startswith(b"-NOAUTH")
    after = support.commandstats(observer)
    assert support.commandstats_delta(before, after) == {"get": 1}


# ---------------------------------------------------------------------------
# metrics parsing
# ---------------------------------------------------------------------------

METRICS_TEXT = """\
# HELP respmeter_commands_total Commands seen.
# TYPE respmeter_commands_total counter
respmeter_commands_total{command="get",result="ok"} 3.0
respmeter_commands_total{command="get",result="error"} 1.0
respmeter_commands_total{command="set",result="ok"} 2.0
# HELP respmeter_connections Open connections.
# TYPE respmeter_connections gauge
respmeter_connections 4.0
"""


def test_parse_metrics_and_metric_sum():
    samples = support.parse_metrics(METRICS_TEXT)
    assert support.MetricSample("respmeter_connections", {}, 4.0, "respmeter_connections", "gauge") in samples
    name = "respmeter_commands_total"
    assert support.metric_sum(samples, name) == {"get": 4.0, "set": 2.0}
    assert support.metric_sum(samples, name, result="ok") == {"get": 3.0, "set": 2.0}
    assert support.metric_sum(samples, name, by=("command", "result"))[("get", "error")] == 1.0
    assert support.metric_sum(samples, name, by=()) == {(): 6.0}
    assert support.metric_sum(samples, "respmeter_commands") == {}  # family name != sample name


# ---------------------------------------------------------------------------
# ProxyProcess, against a stand-in with the same CLI
# ---------------------------------------------------------------------------

FAKE_PROXY = r'''
import argparse, asyncio, os, signal, sys

p = argparse.ArgumentParser()
p.add_argument("mode")
p.add_argument("--listen"); p.add_argument("--upstream"); p.add_argument("--admin")
p.add_argument("--log-level"); p.add_argument("--state-dir")
p.add_argument("--fail", default=None)
p.add_argument("--hang", action="store_true")
a = p.parse_args()
assert a.mode == "run"
print("fake proxy argv", sys.argv[1:], "secret=" + os.environ.get("FAKE_SECRET", ""), flush=True)
if a.fail:
    print(a.fail, file=sys.stderr, flush=True)
    sys.exit(3)
if a.hang:
    import time; time.sleep(60)

METRICS = b"""# TYPE fake_commands_total counter
fake_commands_total{command="ping"} 2.0
fake_commands_total{command="get"} 1.0
"""

def hostport(s):
    h, _, p = s.rpartition(":")
    return h, int(p)

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()

async def handle(r, w):
    ur, uw = await asyncio.open_connection(*hostport(a.upstream.split("://", 1)[1]))
    await asyncio.gather(pipe(r, uw), pipe(ur, w))

async def admin(r, w):
    line = (await r.readline()).decode()
    while (await r.readline()) not in (b"\r\n", b""):
        pass
    path = line.split()[1]
    status, body = (200, b"ok\n") if path == "/healthz" else (200, METRICS) if path == "/metrics" else (404, b"no\n")
    w.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body)
    await w.drain()
    w.close()

async def main():
    try:
        s1 = await asyncio.start_server(handle, *hostport(a.listen))
        s2 = await asyncio.start_server(admin, *hostport(a.admin))
    except OSError as e:
        print("bind failed:", e, file=sys.stderr, flush=True)
        sys.exit(1)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    print("shutting down", flush=True)

asyncio.run(main())
'''


@pytest.fixture
def fake_proxy_cmd(tmp_path):
    script = tmp_path / "fake_proxy.py"
    script.write_text(FAKE_PROXY)
    return [sys.executable, str(script)]


def test_proxy_process_with_fake(proxy_factory, redis_factory, fake_proxy_cmd):
    srv = redis_factory()
    px = proxy_factory(srv, command=fake_proxy_cmd, env={"FAKE_SECRET": "hunter2"})
    assert px.is_running() and px.returncode is None
    assert px.url == f"redis://127.0.0.1:{px.port}"
    assert px.admin_url == f"http://127.0.0.1:{px.admin_port}"
    assert px.argv[-10:] == ["run", "--listen", f"127.0.0.1:{px.port}", "--upstream", srv.url,
                             "--admin", f"127.0.0.1:{px.admin_port}", "--log-level", "debug",
                             "--state-dir", str(px.workdir / "state")][-10:]
    c = px.client()
    assert c.ping() is True
    c.set("via-proxy", "1")
    assert srv.client().get("via-proxy") == b"1"
    assert px.healthz() == (200, "ok\n")
    assert px.metric_sum("fake_commands_total") == {"ping": 2.0, "get": 1.0}
    assert any(s.name == "fake_commands_total" for s in px.metrics())
    assert "secret=hunter2" in px.log_text()
    assert px.log_text().startswith("fake proxy argv")  # only the child's output
    assert px.terminate() == 0
    assert "shutting down" in px.log_text()


def test_proxy_process_kill(proxy_factory, redis_factory, fake_proxy_cmd):
    px = proxy_factory(redis_factory(), command=fake_proxy_cmd)
    pid = px.pid
    assert px.kill() == -signal.SIGKILL
    assert not _pid_alive(pid)


def test_proxy_process_early_exit_reports_log(proxy_factory, fake_proxy_cmd):
    with pytest.raises(support.ProcessStartError, match=r"(?s)exited with 3.*boom: bad flag"):
        proxy_factory("redis://127.0.0.1:1", ["--fail", "boom: bad flag"], command=fake_proxy_cmd)


def test_proxy_process_not_ready_times_out(proxy_factory, fake_proxy_cmd):
    t0 = time.monotonic()
    with pytest.raises(support.ProcessStartError, match=r"(?s)not ready after 1.0s.*fake proxy argv"):
        proxy_factory("redis://127.0.0.1:1", ["--hang"], command=fake_proxy_cmd, ready_timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_proxy_process_retries_on_port_race(proxy_factory, redis_factory, fake_proxy_cmd, monkeypatch):
    srv = redis_factory()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    real = support.free_port
    calls = []

    def fake_free_port(host="127.0.0.1"):
        calls.append(1)
        return busy_port if len(calls) == 1 else real(host)

    monkeypatch.setattr(support, "free_port", fake_free_port)
    try:
        px = proxy_factory(srv, command=fake_proxy_cmd)
        assert px.port != busy_port and px.client().ping()
        assert "address already in use" in px.log_text().lower()
    finally:
        busy.close()


# ---------------------------------------------------------------------------
# ProxyProcess, the real thing (once proxy/server.py exists)
# ---------------------------------------------------------------------------


@pytest.mark.skipif(
    not all((from_repo / "proxy" / f).exists() for f in ("server.py", "cli.py")),
    reason="proxy/server.py or proxy/cli.py (python -m proxy) not written yet",
)
def test_proxy_process_real(proxy_factory, redis_factory):
    srv = redis_factory()
    px = proxy_factory(srv)
    c = px.client()
    assert c.ping() is True
    c.set("k", "v")
    assert c.get("k") == b"v"
    assert srv.client().get("k") == b"v"
    status, _body = px.healthz()
    assert status == 200
    assert px.metrics(), "no samples on /metrics"
    assert px.terminate() == 0
