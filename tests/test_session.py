"""Session logic as playbooks: bytes in from the client, bytes out to the server, replies back. No
sockets: what the server would answer is written out by hand, so every pairing rule is checked."""

from __future__ import annotations

import pytest

from proxy.metrics import Stats
from proxy.resp import encode_command
from proxy.session import Admission, Session

pytestmark = pytest.mark.usefixtures("hot_path")


class Play:
    def __init__(self, label_limit: int = 100, policy=None, connect: bool = True) -> None:  # noqa: ANN001
        self.stats = Stats(label_limit)
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.client_closed = False
        self.upstream_closed = False
        self.now = 0.0
        self.s = Session(
            self.stats,
            self.to_client.append,
            self._close_client,
            clock=lambda: self.now,
            policy=policy,
        )
        if connect:
            self.s.upstream_connected(self.to_upstream.append, self._close_upstream)

    def _close_client(self) -> None:
        self.client_closed = True

    def _close_upstream(self) -> None:
        self.upstream_closed = True

    def send(self, *cmds: list[bytes] | bytes) -> bytes:
        data = b"".join(c if isinstance(c, bytes) else encode_command(c) for c in cmds)
        self.to_upstream.clear()
        self.s.client_data(data)
        return b"".join(self.to_upstream)

    def reply(self, data: bytes, bytewise: bool = False) -> bytes:
        self.to_client.clear()
        if bytewise:
            for i in range(len(data)):
                self.s.upstream_data(data[i : i + 1])
        else:
            self.s.upstream_data(data)
        return b"".join(self.to_client)

    def commands(self) -> dict:
        return {k: v for k, v in self.stats.commands.items()}

    def upstream(self) -> dict[str, int]:
        return self.stats.upstream_by_command()


@pytest.mark.parametrize("bytewise", [False, True])
def test_pipeline_pairs_and_counts(bytewise: bool) -> None:
    p = Play()
    out = p.send([b"SET", b"k", b"v"], [b"GET", b"k"], [b"LPUSH", b"k", b"x"], b"PING\r\n")
    assert out.count(b"\r\n") > 0 and out.endswith(b"PING\r\n")
    replies = b"+OK\r\n$1\r\nv\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n+PONG\r\n"
    assert p.reply(replies, bytewise) == replies
    assert p.commands() == {
        ("anonymous", "set", "ok"): 1,
        ("anonymous", "get", "ok"): 1,
        ("anonymous", "lpush", "error"): 1,
        ("anonymous", "ping", "ok"): 1,
    }
    assert p.upstream() == {"set": 1, "get": 1, "lpush": 1, "ping": 1}
    assert not p.s.pending


def test_unknown_command_forwarded_and_labelled() -> None:
    p = Play()
    assert p.send([b"FOOBAR", b"x"]) == encode_command([b"FOOBAR", b"x"])
    p.reply(b"-ERR unknown command 'FOOBAR'\r\n")
    assert p.commands() == {("anonymous", "unknown", "error"): 1}
    p.send([b"CLIENT", b"NOSUCHSUB"])
    p.reply(b"-ERR unknown subcommand\r\n")
    assert p.upstream() == {"unknown": 2}


@pytest.mark.parametrize("bytewise", [False, True])
def test_resp2_pubsub(bytewise: bool) -> None:
    p = Play()
    p.send([b"SUBSCRIBE", b"a", b"b"], [b"PSUBSCRIBE", b"p*"])
    # confirmations, with a message delivered between them
    replies = (
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
        b"*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n"
    )
    assert p.reply(replies, bytewise) == replies
    assert not p.s.pending
    assert (p.s.subs.channels, p.s.subs.patterns) == (2, 1)
    # PING while subscribed answers with an array in RESP2: paired, not a message
    p.send([b"PING"])
    p.reply(b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n$1\r\nx\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n", bytewise)
    assert p.commands()[("anonymous", "ping", "ok")] == 1
    assert p.stats.pushes == 2
    # UNSUBSCRIBE with no channels: one confirmation per subscribed channel (2), not patterns
    p.send([b"UNSUBSCRIBE"], [b"PING"])
    p.reply(
        b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n"
        b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n"
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
        bytewise,
    )
    assert not p.s.pending
    assert p.commands()[("anonymous", "ping", "ok")] == 2
    assert p.commands()[("anonymous", "unsubscribe", "ok")] == 1
    assert (p.s.subs.channels, p.s.subs.patterns) == (0, 1)


def test_unsubscribe_when_not_subscribed_gets_one_confirmation() -> None:
    p = Play()
    p.send([b"UNSUBSCRIBE"], [b"GET", b"x"])
    p.reply(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n$-1\r\n")
    assert not p.s.pending
    assert p.commands() == {("anonymous", "unsubscribe", "ok"): 1, ("anonymous", "get", "ok"): 1}


@pytest.mark.parametrize("bytewise", [False, True])
def test_resp3_pushes_are_never_replies(bytewise: bool) -> None:
    p = Play()
    p.send([b"HELLO", b"3"])
    p.reply(b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert p.s.protocol == 3
    p.send([b"SUBSCRIBE", b"ch"], [b"GET", b"a"], [b"GET", b"b"])
    replies = (
        b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\n1\r\n"
        b"$1\r\nA\r\n"
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\n2\r\n"
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nz\r\n"
        b"_\r\n"
    )
    assert p.reply(replies, bytewise) == replies
    assert not p.s.pending
    assert p.commands()[("anonymous", "get", "ok")] == 2
    assert p.stats.pushes == 3


def test_transaction_counted_when_executed() -> None:
    p = Play()
    p.send([b"MULTI"], [b"SET", b"a", b"1"], [b"INCR", b"a"], [b"EXEC"])
    assert p.upstream() == {"multi": 1, "exec": 1}
    p.reply(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:2\r\n")
    assert p.upstream() == {"multi": 1, "exec": 1, "set": 1, "incr": 1}
    # discarded: never run, never counted
    p.send([b"MULTI"], [b"SET", b"a", b"1"], [b"DISCARD"])
    p.reply(b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert p.upstream() == {"multi": 2, "exec": 1, "set": 1, "incr": 1, "discard": 1}
    # aborted by WATCH: EXEC answers a null
    cmds = ([b"WATCH", b"a"], [b"MULTI"], [b"SET", b"a", b"1"], [b"EXEC"])
    assert p.send(*cmds) == b"".join(map(encode_command, cmds))
    p.reply(b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n")
    assert p.upstream()["set"] == 1
    # a command rejected while queueing is counted (rejected_calls), EXECABORT runs nothing
    p.send([b"MULTI"], [b"SET", b"a"], [b"INCR", b"a"], [b"EXEC"])
    p.reply(b"+OK\r\n-ERR wrong number of arguments for 'set' command\r\n+QUEUED\r\n-EXECABORT Transaction discarded\r\n")
    assert p.upstream()["set"] == 2
    assert p.upstream()["incr"] == 1
    assert not p.s.in_multi and not p.s.pending


@pytest.mark.parametrize("special", [[b"MULTI"], [b"CLIENT", b"SETNAME", b"w"], [b"SUBSCRIBE", b"c"],
                                     [b"HELLO", b"3"], [b"CLIENT", b"REPLY", b"SKIP"]])
def test_plain_commands_before_a_state_change_are_forwarded(special: list[bytes]) -> None:
    """Plain commands and a state-changing one in the same read all go upstream, in order (the fast
    path once counted the plain ones and dropped their bytes)."""
    p = Play()
    cmds = ([b"SET", b"a", b"1"], [b"GET", b"a"], special, [b"GET", b"b"])
    assert p.send(*cmds) == b"".join(map(encode_command, cmds))
    assert p.upstream()["set"] == 1 and p.upstream()["get"] >= 1


def test_backlog_counts_commands_not_reads() -> None:
    """The bound on commands in flight (the I/O layer pauses reading above it) counts every command,
    however few entries a pipeline takes."""
    p = Play()
    read = encode_command([b"GET", b"k"]) * 2000
    for _ in range(20):
        p.send(read)
    assert p.s.backlog >= 40_000
    p.reply(b"$-1\r\n" * 30_000)
    assert 10_000 <= p.s.backlog <= 10_100
    p.reply(b"$-1\r\n" * 10_000)
    assert p.s.backlog == 0 and not p.s.pending


def test_subscribe_inside_multi_is_queued() -> None:
    p = Play()
    p.send([b"MULTI"], [b"SUBSCRIBE", b"x"], [b"EXEC"])
    p.reply(b"+OK\r\n+QUEUED\r\n*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n")
    assert not p.s.pending
    assert p.upstream() == {"multi": 1, "subscribe": 1, "exec": 1}


def test_client_reply_off_skip_on() -> None:
    p = Play()
    p.send([b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"a", b"1"], [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"a"])
    p.reply(b"+OK\r\n$1\r\n1\r\n")
    assert not p.s.pending
    assert p.commands()[("anonymous", "get", "ok")] == 1
    p.send([b"CLIENT", b"REPLY", b"SKIP"], [b"SET", b"a", b"2"], [b"GET", b"a"])
    p.reply(b"$1\r\n2\r\n")
    assert not p.s.pending
    assert p.commands()[("anonymous", "get", "ok")] == 2


def test_replies_around_client_reply_off_in_one_read_pair_with_their_commands() -> None:
    """A reply before CLIENT REPLY OFF and those after CLIENT REPLY ON, in one read: the silenced
    entries between are passed over, not paired with the next replies (they were, on the path for
    reads with nothing special in flight: CLIENT REPLY ON and GET stayed pending, so a half-closed
    client was never let go, and their counts were missing)."""
    p = Play()
    p.send([b"PING", b"a"], [b"CLIENT", b"REPLY", b"OFF"], [b"PING", b"b"], [b"CLIENT", b"REPLY", b"ON"],
           [b"GET", b"k"])
    assert p.reply(b"$1\r\na\r\n+OK\r\n$-1\r\n") == b"$1\r\na\r\n+OK\r\n$-1\r\n"
    assert not p.s.pending
    assert p.commands() == {("anonymous", "ping", "ok"): 2, ("anonymous", "client|reply", "ok"): 2,
                            ("anonymous", "get", "ok"): 1}


def test_client_reply_queued_in_multi_acts_at_exec() -> None:
    """Inside MULTI, CLIENT REPLY OFF is queued (+QUEUED) and acts when EXEC runs it; DISCARD
    leaves replies on."""
    p = Play()
    p.send([b"MULTI"], [b"CLIENT", b"REPLY", b"OFF"], [b"DISCARD"], [b"PING"])
    assert p.reply(b"+OK\r\n+QUEUED\r\n+OK\r\n+PONG\r\n") == b"+OK\r\n+QUEUED\r\n+OK\r\n+PONG\r\n"
    assert not p.s.pending and not p.s.reply_off
    p.send([b"MULTI"], [b"CLIENT", b"REPLY", b"OFF"])
    assert p.s.reply_off is False
    p.send([b"EXEC"])
    assert p.s.reply_off is True


def test_client_names_become_labels_with_a_cap() -> None:
    p = Play(label_limit=2)
    p.send([b"CLIENT", b"SETNAME", b"worker-1"])
    p.reply(b"+OK\r\n")
    p.send([b"GET", b"a"])
    p.reply(b"$-1\r\n")
    assert p.commands()[("worker-1", "get", "ok")] == 1
    p.send([b"HELLO", b"3", b"SETNAME", b"web"])
    p.reply(b"%0\r\n")
    p.send([b"GET", b"a"])
    p.reply(b"_\r\n")
    assert p.commands()[("web", "get", "ok")] == 1
    p.send([b"CLIENT", b"SETNAME", b"third"])
    p.reply(b"+OK\r\n")
    p.send([b"GET", b"a"])
    p.reply(b"_\r\n")
    assert p.commands()[("other", "get", "ok")] == 1
    # a failed SETNAME changes nothing
    p.send([b"CLIENT", b"SETNAME", b"bad name"])
    p.reply(b"-ERR Client names cannot contain spaces\r\n")
    assert p.s.client == "other"


class RejectEcho:
    """A policy that answers ECHO locally and holds SLEEP until resumed."""

    def __init__(self) -> None:
        self.hold = True

    def init_session(self, session):  # noqa: ANN001, ANN201
        pass

    def fast_admit(self, session, n):  # noqa: ANN001, ANN201
        return False

    def admit(self, session, args, info, name):  # noqa: ANN001, ANN201
        if name == "echo":
            return Admission.REPLY, b"-ERR refused\r\n", "rejected"
        if args[0].upper() == b"SLEEP" and self.hold:
            return Admission.WAIT, None, ""
        return Admission.FORWARD, None, ""


def test_local_answers_keep_their_place() -> None:
    p = Play(policy=RejectEcho())
    out = p.send([b"GET", b"a"], [b"ECHO", b"x"], [b"GET", b"b"], [b"ECHO", b"y"])
    assert out == encode_command([b"GET", b"a"]) + encode_command([b"GET", b"b"])
    assert p.to_client == []  # the refusal waits for GET a's reply
    assert p.reply(b"$1\r\nA\r\n") == b"$1\r\nA\r\n-ERR refused\r\n"
    assert p.reply(b"$1\r\nB\r\n") == b"$1\r\nB\r\n-ERR refused\r\n"
    assert p.commands()[("anonymous", "echo", "rejected")] == 2
    assert p.upstream() == {"get": 2}


def test_held_commands_keep_order() -> None:
    pol = RejectEcho()
    p = Play(policy=pol)
    out = p.send([b"GET", b"a"], b"SLEEP\r\n", [b"GET", b"b"])
    assert out == encode_command([b"GET", b"a"])
    pol.hold = False
    p.to_upstream.clear()
    p.s.resume()
    assert b"".join(p.to_upstream) == b"SLEEP\r\n" + encode_command([b"GET", b"b"])


def test_protocol_error_answered_after_inflight_then_closed() -> None:
    p = Play()
    p.send([b"GET", b"a"], b"*1\r\n:1\r\n")
    assert p.stats.protocol_errors == 1
    assert not p.client_closed
    assert p.reply(b"$1\r\nA\r\n") == b"$1\r\nA\r\n-ERR Protocol error: expected '$', got ':'\r\n"
    assert p.client_closed and p.upstream_closed


def test_upstream_unavailable() -> None:
    p = Play(connect=False)
    p.s.client_data(encode_command([b"GET", b"a"]) + encode_command([b"PING"]))
    assert p.to_client == []
    p.s.upstream_failed("connection refused")
    assert b"".join(p.to_client) == b"-ERR upstream unavailable: connection refused\r\n" * 2
    assert p.client_closed
    assert p.commands() == {("anonymous", "get", "rejected"): 1, ("anonymous", "ping", "rejected"): 1}
    assert p.upstream() == {}


def test_handshake_replies_are_consumed() -> None:
    stats = Stats()
    to_client: list[bytes] = []
    to_up: list[bytes] = []
    s = Session(stats, to_client.append, lambda: None)
    seen = []
    s.client_data(encode_command([b"GET", b"a"]))
    s.upstream_connected(to_up.append, lambda: None, [([b"AUTH", b"secret"], lambda err, data: seen.append((err, data)))])
    assert b"".join(to_up) == encode_command([b"AUTH", b"secret"]) + encode_command([b"GET", b"a"])
    s.upstream_data(b"+O")
    s.upstream_data(b"K\r\n$1\r\n")
    s.upstream_data(b"A\r\n")
    assert b"".join(to_client) == b"$1\r\nA\r\n"
    assert seen == [(False, b"+OK\r\n")]
    assert stats.upstream == {("respmeter", "auth"): 1, ("anonymous", "get"): 1}


def test_monitor_passes_everything_through() -> None:
    p = Play()
    p.send([b"MONITOR"])
    p.reply(b"+OK\r\n")
    assert p.s.monitor
    stream = b'+1700000000.1 [0 127.0.0.1:1] "GET" "x"\r\n+1700000000.2 [0 127.0.0.1:1] "SET" "x" "y"\r\n'
    assert p.reply(stream) == stream
    assert p.stats.pushes >= 2
