"""Connection corner cases as the server does them (issue 11): QUIT and half-close."""

from __future__ import annotations

import socket

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
    assert support.commandstats_delta(before, support.commandstats(direct)) == {"set": 1, "quit": 1, "get": 2}
    up = proxy.metric_sum("respmeter_upstream_commands_total")
    assert up == {"set": 1.0, "quit": 1.0}
    seen = proxy.metric_sum("respmeter_commands_total")
    assert seen == {"set": 1.0, "quit": 1.0}
    # the same split over two writes: what comes after QUIT is never read
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.sendall(encode_resp("QUIT"))
    sock.sendall(encode_resp("INCR", "qq"))
    assert _read_all(sock) == b"+OK\r\n"
    assert direct.get("qq") is None


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
