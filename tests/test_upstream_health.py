"""The upstream's health is real (issue 11, points 6-8): an upstream that does not speak RESP, one
that stalls, and TCP keepalive on upstream sockets."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

import support
from support import RespError, RespSocket


class FakeUpstream:
    """A loopback TCP server that answers every connection with ``reply`` (once it has read
    something), or says nothing at all (``reply=None``: a stalled server)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                if self.reply is not None:
                    conn.sendall(self.reply)
                    conn.close()
                    return
        except OSError:
            pass

    def close(self) -> None:
        self.stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake_upstream():
    made: list[FakeUpstream] = []

    def make(reply: bytes | None) -> FakeUpstream:
        made.append(FakeUpstream(reply))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_an_http_service_as_upstream_is_reported_as_such(fake_upstream, proxy_factory) -> None:
    http = fake_upstream(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    proxy = proxy_factory(f"redis://127.0.0.1:{http.port}", log_level="info")
    r = RespSocket(proxy.host, proxy.port).call("PING")
    assert r == RespError("ERR upstream does not speak RESP: got 'HTTP/1.1 400 Bad Request'")
    status, body = proxy.healthz()
    assert status == 503 and "does not speak RESP" in body
    assert proxy.metric_sum("respmeter_upstream_up", by=()).get(()) == 0
    assert "WARNING" in proxy.log_text() and "got 'HTTP/1.1 400 Bad Request'" in proxy.log_text()
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("protocol") == 1


def test_a_tls_port_addressed_as_redis_is_reported_as_such(redis_factory, tls_material, proxy_factory) -> None:
    server = redis_factory(tls=tls_material)
    proxy = proxy_factory(f"redis://127.0.0.1:{server.port}", log_level="info")
    r = RespSocket(proxy.host, proxy.port).call("PING")
    assert isinstance(r, RespError) and "rediss://" in r, r
    status, body = proxy.healthz()
    assert status == 503 and "rediss://" in body
    # and a client of a correctly addressed proxy still works: nothing sticky leaks across proxies
    good = proxy_factory(server.url, ["--upstream-ca", str(tls_material.ca_cert)], log_level="info")
    assert good.client().ping()


def test_a_stalled_upstream_times_out_and_is_reported(fake_upstream, proxy_factory) -> None:
    stalled = fake_upstream(None)
    proxy = proxy_factory(f"redis://127.0.0.1:{stalled.port}", ["--upstream-timeout", "1"], log_level="info")
    s = RespSocket(proxy.host, proxy.port, timeout=10)
    t0 = time.monotonic()
    r = s.call("GET", "k")
    waited = time.monotonic() - t0
    assert isinstance(r, RespError) and r.startswith("ERR upstream timeout"), r
    assert 0.9 < waited < 4, waited
    with pytest.raises(ConnectionError):
        s.read()  # and the connection is closed
    status, body = proxy.healthz()
    assert status == 503 and "upstream timeout" in body
    assert proxy.metric_sum("respmeter_upstream_errors_total", by=("kind",)).get("timeout") == 1


def test_blocking_commands_wait_their_own_timeout(redis_factory, proxy_factory) -> None:
    server = redis_factory()
    proxy = proxy_factory(server, ["--upstream-timeout", "1"], log_level="info")
    c = proxy.client(socket_timeout=10)
    t0 = time.monotonic()
    assert c.blpop(["never"], timeout=2) is None  # longer than --upstream-timeout: still fine
    assert time.monotonic() - t0 >= 1.9
    assert c.set("after", "1")
    t0 = time.monotonic()
    assert c.execute_command("WAIT", 1, 2000) == 0  # no replica: WAIT blocks its 2 s, then says 0
    assert time.monotonic() - t0 >= 1.9
    assert proxy.healthz()[0] == 200


def test_upstream_sockets_have_tcp_keepalive(redis_factory, proxy_factory) -> None:
    server = redis_factory()
    proxy = proxy_factory(server, ["--upstream-keepalive", "30,10,3"], log_level="info")
    c = proxy.client()
    c.ping()
    out = subprocess.run(["ss", "-tno", "state", "established", f"( dport = :{server.port} )"],
                         capture_output=True, text=True, check=True).stdout
    assert "keepalive" in out, out
    off = proxy_factory(server, ["--upstream-keepalive", "0"], log_level="info")
    c2 = off.client()
    c2.ping()
    out = subprocess.run(["ss", "-tnop", "state", "established", f"( dport = :{server.port} )"],
                         capture_output=True, text=True, check=True).stdout
    mine = [line for line in out.splitlines() if f"pid={off.pid}," in line]
    assert mine and not any("keepalive" in line for line in mine), out


@pytest.mark.parametrize("server_password", [None, "right-Pa55word"])
def test_a_wrong_upstream_password_fails_closed(server_password, redis_factory, proxy_factory) -> None:
    """Issue 11.8: when the upstream refuses the proxy's own AUTH, nothing of the client's is
    forwarded on that connection (a server that needs no password would have run it)."""
    server = redis_factory(password=server_password)
    direct = server.client()
    before = support.commandstats(direct)
    # (no user name: with one, a server without a password accepts any AUTH default <anything>)
    proxy = proxy_factory(server.url_with_auth(None, "wrong-Pa55word"), log_level="info")
    for attempt in range(2):
        s = RespSocket(proxy.host, proxy.port)
        s.send(support.encode_resp("SET", "leak", str(attempt)) + support.encode_resp("INCR", "leaks"))
        assert s.read() == RespError("ERR upstream rejected the proxy's credentials")
        assert s.read() == RespError("ERR upstream rejected the proxy's credentials")
        with pytest.raises(ConnectionError):
            s.read()
    delta = support.commandstats_delta(before, support.commandstats(direct))
    assert "set" not in delta and "incr" not in delta and delta.get("auth") == 2, delta
    assert direct.get("leak") is None
    status, body = proxy.healthz()
    assert status == 503 and "rejected the proxy's credentials" in body
    if server_password is None:
        return  # (HELLO 3 AUTH default <anything> is accepted by a server without a password)
    # redis-py's HELLO 3 (carrying the proxy's AUTH): its own error, then nothing more goes
    c = proxy.client(protocol=3)
    with pytest.raises(Exception):
        c.set("leak", "hello")
    assert direct.get("leak") is None
