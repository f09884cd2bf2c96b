"""CLIENT MAINT_NOTIFICATIONS ON goes upstream as OFF.

redis-py 8 sends ON on every RESP3 connection (maintenance notifications "auto"). A server that knows
it (Redis Software, Redis Cloud) then pushes MOVING when the database moves, and redis-py reconnects
to the address in the push by itself: past the proxy, where its commands are neither counted nor
capped. As OFF, a server without the feature refuses it exactly as it refuses ON, and one with it
says OK and pushes nothing.

``MaintServer`` is such a server: it knows the command, and a connection that turns the
notifications on gets a MOVING push to another loopback address before its next reply.
"""

from __future__ import annotations

import socket
import threading

import hiredis
import pytest

from support import LoopbackServer, RespError, RespSocket, encode_resp

ON = ("CLIENT", "MAINT_NOTIFICATIONS", "ON", "moving-endpoint-type", "internal-ip")


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


class MaintServer(LoopbackServer):
    """A loopback server that knows CLIENT MAINT_NOTIFICATIONS (and what redis-py's handshake, SET,
    GET and PING need). A connection that turns the notifications on gets ``MOVING 1 15
    127.0.0.2:<its port>`` before its next reply."""

    def __init__(self) -> None:
        super().__init__()
        self.moving_to = b"127.0.0.2:%d" % self.port
        self.seen: list[list[bytes]] = []
        self.data: dict[bytes, bytes] = {}
        self.lock = threading.Lock()

    def talk(self, conn: socket.socket, cid: int) -> None:
        reader = hiredis.Reader()
        proto, on, pushed = 2, False, False
        while data := conn.recv(65536):
            reader.feed(data)
            out = []
            while (args := reader.gets()) is not False:
                with self.lock:
                    self.seen.append([a.lower() for a in args[:2]] + list(args[2:]))
                if on and not pushed and proto == 3:
                    out.append(b">4\r\n" + _bulk(b"MOVING") + b":1\r\n:15\r\n" + _bulk(self.moving_to))
                    pushed = True
                name = args[0].lower()
                sub = args[1].lower() if len(args) > 1 else b""
                if name == b"hello":
                    proto = int(args[1]) if len(args) > 1 else proto
                    fields = [(b"server", _bulk(b"redis")), (b"version", _bulk(b"8.2.0")),
                              (b"proto", b":%d\r\n" % proto), (b"id", b":%d\r\n" % cid),
                              (b"mode", _bulk(b"standalone")), (b"role", _bulk(b"master")),
                              (b"modules", b"*0\r\n")]
                    head = b"%%%d\r\n" % len(fields) if proto == 3 else b"*%d\r\n" % (2 * len(fields))
                    out.append(head + b"".join(_bulk(k) + v for k, v in fields))
                elif name == b"client" and sub == b"maint_notifications":
                    on = len(args) > 2 and args[2].lower() == b"on"
                    out.append(b"+OK\r\n")
                elif name == b"client" and sub in (b"setinfo", b"setname"):
                    out.append(b"+OK\r\n")
                elif name == b"ping":
                    out.append(b"+PONG\r\n")
                elif name == b"set" and len(args) == 3:
                    self.data[args[1]] = args[2]
                    out.append(b"+OK\r\n")
                elif name == b"get" and len(args) == 2:
                    v = self.data.get(args[1])
                    out.append(_bulk(v) if v is not None else (b"_\r\n" if proto == 3 else b"$-1\r\n"))
                else:
                    out.append(b"-ERR unknown command '%s'\r\n" % args[0][:40])
            conn.sendall(b"".join(out))

    def turned_on(self) -> int:
        with self.lock:
            return sum(1 for a in self.seen if a[:2] == [b"client", b"maint_notifications"]
                       and len(a) > 2 and a[2].lower() == b"on")



@pytest.fixture
def maint_server():
    server = MaintServer()
    yield server
    server.close()


def test_the_server_would_move_a_direct_client_past_anything_in_between(maint_server):
    """The control: straight to such a server, redis-py's defaults turn the notifications on, and
    the MOVING push sends the client to the new address on its own."""
    redis = pytest.importorskip("redis")
    c = redis.Redis(host="127.0.0.1", port=maint_server.port, protocol=3, socket_timeout=5)
    with pytest.raises(redis.ConnectionError, match=r"127\.0\.0\.2"):
        for _ in range(5):
            c.set("k", "v")
    assert maint_server.turned_on() >= 1
    c.close()


@pytest.mark.parametrize("pool", [0, 2])
def test_a_redis_py_client_stays_on_the_proxy(maint_server, proxy_factory, pool):
    redis = pytest.importorskip("redis")
    from redis.maint_notifications import MaintNotificationsConfig

    proxy = proxy_factory(f"redis://127.0.0.1:{maint_server.port}", ["--upstream-pool", str(pool)])
    clients = [redis.Redis(host=proxy.host, port=proxy.port, protocol=3, socket_timeout=5) for _ in range(3)]
    # (one that requires them: told OK, and so it connects, and it is never moved either)
    clients.append(redis.Redis(host=proxy.host, port=proxy.port, protocol=3, socket_timeout=5,
                               maint_notifications_config=MaintNotificationsConfig(enabled=True)))
    for i, c in enumerate(clients):
        for j in range(5):
            assert c.set(f"k{i}", str(j)) is True
            assert c.get(f"k{i}") == str(j).encode()
        assert c.connection_pool.connection_kwargs["host"] == proxy.host
    assert maint_server.turned_on() == 0  # the server had nothing to push
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    # (its OK to OFF: from the server on a connection of the client's own, from the pool's probe)
    assert outcomes.get(("client|maint_notifications", "local" if pool else "ok")) == 4, outcomes
    upstream = proxy.metric_sum("respmeter_upstream_commands_total", by=("client", "command"))
    mine = sum(n for (c, cmd), n in upstream.items() if cmd == "client|maint_notifications" and c != "respmeter")
    assert mine == (0 if pool else 4), upstream  # (billed as sent, on a connection of its own)
    for c in clients:
        c.close()


def test_the_proxy_answers_as_redis_7_does(redis_factory, proxy_factory):
    """Byte for byte what Redis 7 (which does not know the command) answers: on its own, in a
    transaction (refused while queueing, it aborts EXEC), after CLIENT REPLY SKIP and under CLIENT
    REPLY OFF (no reply at all); and it is billed as the error it is."""
    server = redis_factory()
    proxy = proxy_factory(server)
    script = b"".join(encode_resp(*c) for c in [
        ("CLIENT", "maint_notifications", "on", "moving-endpoint-type", "internal-ip"),
        ("MULTI",), ON, ("SET", "k", "v"), ("EXEC",),
        ("CLIENT", "REPLY", "SKIP"), ON, ("PING",),
        ("CLIENT", "REPLY", "OFF"), ON, ("PING",), ("CLIENT", "REPLY", "ON"),
        ("CLIENT", "MAINT_NOTIFICATIONS", "OFF"), ("GET", "k"),
    ])
    replies = []
    for host, port in ((server.host, server.port), (proxy.host, proxy.port)):
        s = RespSocket(host, port)
        s.send(script)
        replies.append([s.read() for _ in range(9)])
    direct, proxied = replies
    assert direct[0] == RespError("ERR unknown subcommand 'maint_notifications'. Try CLIENT HELP.")
    assert proxied == direct
    assert proxied[4].startswith("EXECABORT") and proxied[5] == b"PONG" and proxied[6] == b"OK"
    assert server.client().get("k") is None  # the aborted transaction did not run
    outcomes = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    # (the two under CLIENT REPLY SKIP / OFF have no reply to tell an error by: ok, as any command)
    assert {o: n for (c, o), n in outcomes.items() if c == "client|maint_notifications"} == {"error": 3, "ok": 2}
    upstream = proxy.metric_sum("respmeter_upstream_commands_total", by=("command",))
    assert upstream.get("client|maint_notifications") == 5, upstream
