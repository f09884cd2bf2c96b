"""Client authentication and upstream credential injection, sans I/O: a real proxy.gate.Gate as the
policy of a real proxy.session.Session, with list sinks, a fake clock and a fake ``call_later``.

What the server would answer is written out by hand, so every byte the proxy sends upstream (and
every byte it does NOT send) is checked exactly.
"""

from __future__ import annotations

import pytest

from proxy.auth import (
    HELLO_NOAUTH,
    NOAUTH,
    WRONGPASS,
    AuthConfigError,
    FailureThrottle,
    UpstreamAuth,
    User,
    Verifier,
    check_hash_format,
    hash_password,
    parse_users,
    split_hello,
    verify_hash,
)
from proxy.gate import Gate
from proxy.metrics import Stats
from proxy.resp import encode_command
from proxy.session import Session

pytestmark = pytest.mark.usefixtures("hot_path")

# Distinctive secrets: any of them in an upstream byte stream (or a log line) is a leak.
ALICE_PW = b"Al1ce-Cl13nt-Pw-q7"
DEFAULT_PW = b"D3fault-Cl13nt-Pw-z9"
UP_PW = "S3cr3t-T0k3n-xyz"

_HASHES: dict[bytes, str] = {}


def _hash(pw: bytes) -> str:
    if pw not in _HASHES:
        _HASHES[pw] = hash_password(pw.decode())
    return _HASHES[pw]


def users() -> dict[str, User]:
    return {
        "alice": User("alice", _hash(ALICE_PW), "billing"),
        "default": User("default", _hash(DEFAULT_PW), "default-user"),
    }


def C(*args: bytes | str) -> bytes:  # noqa: N802 - one encoded command
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


class Timers:
    """A fake loop.call_later: callbacks run only when the test advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[tuple[float, object]] = []

    def call_later(self, delay: float, fn) -> None:  # noqa: ANN001
        self.pending.append((self.now + delay, fn))

    def advance(self, dt: float) -> None:
        self.now += dt
        due = [x for x in self.pending if x[0] <= self.now + 1e-12]
        self.pending = [x for x in self.pending if x[0] > self.now + 1e-12]
        for _, fn in sorted(due, key=lambda x: x[0]):
            fn()


class Play:
    """One client connection through a Gate; ``send`` returns the bytes written upstream."""

    def __init__(
        self,
        *,
        verifier: bool = True,
        up: UpstreamAuth | None = None,
        listener: str | None = None,
        peer: str = "('10.0.0.7', 40000)",
        timers: Timers | None = None,
        gate: Gate | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.timers = timers or Timers()
        self.auth_errors: list[str] = []
        self.gate = gate or Gate(
            verifier=Verifier(users()) if verifier else None,
            upstream_auth=up,
            call_later=self.timers.call_later,
            clock=lambda: self.timers.now,
            on_upstream_auth_error=self.auth_errors.append,
        )
        self.stats = stats or Stats()
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.client_closed = False
        self.s = Session(
            self.stats,
            self.to_client.append,
            self._close,
            listener=listener,
            peer=peer,
            clock=lambda: self.timers.now,
            policy=self.gate,
        )
        # the proxy connects upstream eagerly, before the client says anything
        self.s.upstream_connected(self.to_upstream.append, lambda: None)
        assert self.to_upstream == []

    def _close(self) -> None:
        self.client_closed = True

    def send(self, *cmds: bytes) -> bytes:
        self.to_upstream.clear()
        self.to_client.clear()
        self.s.client_data(b"".join(cmds))
        return self.sent()

    def got(self) -> bytes:
        return b"".join(self.to_client)

    def sent(self) -> bytes:
        """What went upstream since the last send() or sent() (e.g. while replies came in)."""
        out = b"".join(self.to_upstream)
        self.to_upstream.clear()
        return out

    def reply(self, data: bytes) -> bytes:
        self.to_client.clear()
        self.s.upstream_data(data)
        return b"".join(self.to_client)

    def commands(self) -> dict:
        return dict(self.stats.commands)

    def upstream(self) -> dict:
        return dict(self.stats.upstream)


# ---------------------------------------------------------------------------------------------
# unauthenticated clients: nothing reaches the upstream
# ---------------------------------------------------------------------------------------------


def test_unauthenticated_commands_get_noauth_and_nothing_goes_upstream() -> None:
    p = Play(up=UpstreamAuth("default", UP_PW))
    out = p.send(C("GET", "a"), C("SET", "a", "1"), C("CLIENT", "SETNAME", "x"), C("PING"), C("FOOBAR"))
    assert out == b""
    assert p.got() == NOAUTH * 5
    assert NOAUTH == b"-NOAUTH Authentication required.\r\n"
    assert p.upstream() == {}  # not even the proxy's own AUTH
    assert p.commands() == {
        ("anonymous", "get", "rejected"): 1,
        ("anonymous", "set", "rejected"): 1,
        ("anonymous", "client|setname", "rejected"): 1,
        ("anonymous", "ping", "rejected"): 1,
        ("anonymous", "unknown", "rejected"): 1,
    }
    assert p.s.name is None  # the refused SETNAME changed nothing
    assert not p.client_closed


def test_pre_auth_commands_quit_reset_hello() -> None:
    p = Play(up=UpstreamAuth(None, UP_PW))
    assert p.send(C("RESET")) == b""
    assert p.got() == b"+RESET\r\n"
    assert p.send(C("HELLO", "3")) == b""
    assert p.got() == HELLO_NOAUTH
    assert p.got().startswith(b"-NOAUTH HELLO must be called with the client already authenticated")
    assert p.s.protocol == 2
    assert p.send(C("QUIT")) == b""
    assert p.got() == b"+OK\r\n"
    assert p.client_closed
    assert p.upstream() == {}


def test_pipelined_commands_after_noauth_stay_in_order() -> None:
    p = Play(up=UpstreamAuth(None, UP_PW))
    out = p.send(C("GET", "a"), C("AUTH", "alice", ALICE_PW), C("GET", "b"))
    # the first GET is refused, AUTH is answered locally, the second GET goes upstream once the
    # proxy's own credentials are accepted
    assert out == C("AUTH", UP_PW)
    assert ALICE_PW not in out
    assert p.got() == NOAUTH + b"+OK\r\n"  # in order, before GET b's reply
    assert p.reply(b"+OK\r\n") == b""
    assert p.sent() == C("GET", "b")
    assert p.reply(b"$1\r\nB\r\n") == b"$1\r\nB\r\n"
    # all three replies in order overall
    assert p.commands()[("billing", "get", "ok")] == 1
    assert p.commands()[("anonymous", "get", "rejected")] == 1


def test_auth_ok_reply_is_ordered_before_later_replies() -> None:
    p = Play(up=UpstreamAuth(None, UP_PW))
    out = p.send(C("AUTH", "alice", ALICE_PW), C("GET", "b"))
    assert out == C("AUTH", UP_PW)
    assert p.got() == b"+OK\r\n"
    assert p.reply(b"+OK\r\n") == b"" and p.sent() == C("GET", "b")
    assert p.reply(b"$1\r\nB\r\n") == b"$1\r\nB\r\n"


# ---------------------------------------------------------------------------------------------
# client authentication forms
# ---------------------------------------------------------------------------------------------


def test_auth_user_pass_and_label() -> None:
    p = Play()
    assert p.send(C("AUTH", "alice", ALICE_PW)) == b""
    assert p.got() == b"+OK\r\n"
    assert p.s.authed and p.s.client == "billing"
    assert p.send(C("GET", "a")) == C("GET", "a")  # no upstream credentials: nothing injected
    p.reply(b"$-1\r\n")
    assert p.commands()[("billing", "get", "ok")] == 1
    assert p.upstream() == {("billing", "get"): 1}
    # AUTH itself is answered locally, counted as such (and never forwarded)
    assert p.commands()[("anonymous", "auth", "local")] == 1


def test_auth_password_only_is_user_default() -> None:
    p = Play()
    assert p.send(C("AUTH", DEFAULT_PW)) == b""
    assert p.got() == b"+OK\r\n"
    assert p.s.client == "default-user"
    # and alice's password is not the default user's
    q = Play()
    q.send(C("AUTH", ALICE_PW))
    assert q.got() == WRONGPASS
    assert not q.s.authed


def test_wrong_password_and_unknown_user() -> None:
    p = Play(up=UpstreamAuth(None, UP_PW))
    assert p.send(C("AUTH", "alice", "nope")) == b""
    assert p.got() == WRONGPASS
    assert p.got().startswith(b"-WRONGPASS ")
    assert p.send(C("AUTH", "mallory", ALICE_PW)) == b""
    assert p.got() == WRONGPASS
    assert p.send(C("GET", "a")) == b""
    assert p.got() == NOAUTH
    assert p.upstream() == {}
    assert p.commands()[("anonymous", "auth", "rejected")] == 2


def test_auth_wrong_arity_is_answered_locally() -> None:
    p = Play(up=UpstreamAuth(None, UP_PW))
    assert p.send(C("AUTH")) == b""
    assert p.got().startswith(b"-ERR wrong number of arguments for 'auth'")
    assert p.send(C("AUTH", "a", "b", "c")) == b""
    assert p.got().startswith(b"-ERR wrong number of arguments")
    assert p.upstream() == {}


def test_hello_auth_authenticates_and_switches_protocol() -> None:
    p = Play(up=UpstreamAuth("default", UP_PW))
    out = p.send(C("HELLO", "3", "AUTH", "alice", ALICE_PW, "SETNAME", "web"))
    # the client's HELLO carries the proxy's credentials: one command, no separate AUTH
    assert out == C("HELLO", "3", "AUTH", "default", UP_PW, "SETNAME", "web")
    assert ALICE_PW not in out
    assert p.s.authed and p.s.client == "billing"
    p.reply(b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert p.s.protocol == 3
    assert p.s.name == b"web"
    assert p.s.client == "billing"  # the user wins over CLIENT SETNAME
    assert p.upstream() == {("billing", "hello"): 1}
    assert ("respmeter", "auth") not in p.upstream()
    assert p.send(C("GET", "a")) == C("GET", "a")
    p.reply(b"_\r\n")
    assert p.commands()[("billing", "get", "ok")] == 1


def test_hello_auth_wrong_password() -> None:
    p = Play(up=UpstreamAuth("default", UP_PW))
    assert p.send(C("HELLO", "3", "AUTH", "alice", "bad")) == b""
    assert p.got() == WRONGPASS
    assert not p.s.authed and p.s.protocol == 2
    assert p.upstream() == {}


def test_hello_auth_unsupported_protocol() -> None:
    p = Play(up=UpstreamAuth("default", UP_PW))
    assert p.send(C("HELLO", "4", "AUTH", "alice", ALICE_PW)) == b""
    assert p.got().startswith(b"-NOPROTO")
    assert not p.s.authed


def test_hello_after_auth_is_forwarded_without_credentials() -> None:
    p = Play()
    p.send(C("AUTH", "alice", ALICE_PW))
    out = p.send(C("HELLO", "3", "AUTH", "alice", ALICE_PW, "SETNAME", "w2"))
    assert out == C("HELLO", "3", "SETNAME", "w2")
    p.reply(b"%0\r\n")
    assert p.s.protocol == 3 and p.s.name == b"w2"


def test_hello_setname_named_auth_is_not_mistaken_for_credentials() -> None:
    args = [b"HELLO", b"3", b"SETNAME", b"AUTH", b"AUTH", b"u", b"p"]
    assert split_hello(args) == ([b"HELLO", b"3", b"SETNAME", b"AUTH"], (b"u", b"p"))
    assert split_hello([b"HELLO", b"2", b"auth", b"u", b"p"]) == ([b"HELLO", b"2"], (b"u", b"p"))
    assert split_hello([b"HELLO"]) == ([b"HELLO"], None)


# ---------------------------------------------------------------------------------------------
# upstream credentials only (no proxy users): the client's AUTH is answered, never forwarded
# ---------------------------------------------------------------------------------------------


def test_upstream_auth_prefix_counted_under_respmeter() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    assert p.s.authed and not p.s.up_ready
    out = p.send(C("SET", "a", "1"), C("GET", "a"))
    assert out == C("AUTH", UP_PW)  # alone: nothing of the client's goes before it is accepted
    # the AUTH reply is consumed by the proxy
    assert p.reply(b"+OK\r\n") == b""
    assert p.sent() == C("SET", "a", "1") + C("GET", "a")
    assert p.reply(b"+OK\r\n$1\r\n1\r\n") == b"+OK\r\n$1\r\n1\r\n"
    assert p.upstream() == {("respmeter", "auth"): 1, ("anonymous", "set"): 1, ("anonymous", "get"): 1}
    assert p.auth_errors == []
    # later commands: no AUTH again, and the fast path
    assert p.send(C("GET", "a")) == C("GET", "a")
    assert p.upstream()[("respmeter", "auth")] == 1


def test_upstream_auth_with_username_and_db() -> None:
    p = Play(verifier=False, up=UpstreamAuth("app", UP_PW, 3))
    out = p.send(C("PING"))
    assert out == C("AUTH", "app", UP_PW) + C("SELECT", "3")
    assert p.reply(b"+OK\r\n+OK\r\n") == b"" and p.sent() == C("PING")
    assert p.reply(b"+PONG\r\n") == b"+PONG\r\n"
    assert p.upstream() == {("respmeter", "auth"): 1, ("respmeter", "select"): 1, ("anonymous", "ping"): 1}


def test_upstream_auth_byte_by_byte_replies() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    p.send(C("GET", "a"))
    got = b""
    for b in b"+OK\r\n$2\r\nAA\r\n":
        got += p.reply(bytes([b]))
    assert got == b"$2\r\nAA\r\n"
    assert not p.s.pending


def test_client_auth_is_answered_locally_not_forwarded() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    out = p.send(C("AUTH", "someone", "their-own-Pw-123"), C("AUTH", "pw-only-456"), C("GET", "a"))
    assert b"their-own-Pw-123" not in out and b"pw-only-456" not in out
    assert out == C("AUTH", UP_PW)
    assert p.got() == b"+OK\r\n+OK\r\n"
    p.reply(b"+OK\r\n")
    assert p.sent() == C("GET", "a")
    assert p.commands()[("anonymous", "auth", "local")] == 2
    assert ("anonymous", "auth") not in p.upstream()


def test_first_hello_carries_upstream_credentials() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    out = p.send(C("HELLO", "3", "SETNAME", "celery"))
    assert out == C("HELLO", "3", "AUTH", "default", UP_PW, "SETNAME", "celery")
    assert p.reply(b"%1\r\n$5\r\nproto\r\n:3\r\n") == b"%1\r\n$5\r\nproto\r\n:3\r\n"
    assert p.s.protocol == 3
    assert p.s.client == "celery"
    assert p.upstream() == {("anonymous", "hello"): 1}  # the client's own command, no AUTH
    assert ("respmeter", "auth") not in p.upstream()


def test_first_hello_with_client_credentials_is_rewritten() -> None:
    p = Play(verifier=False, up=UpstreamAuth("app", UP_PW))
    out = p.send(C("HELLO", "3", "AUTH", "default", "client-side-Pw-777"))
    assert out == C("HELLO", "3", "AUTH", "app", UP_PW)
    assert b"client-side-Pw-777" not in out


def test_later_hello_with_credentials_loses_them() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    p.send(C("PING"))
    p.reply(b"+OK\r\n+PONG\r\n")
    out = p.send(C("HELLO", "2", "AUTH", "u", "client-side-Pw-888"))
    assert out == C("HELLO", "2")


def test_hello_without_protover_gets_handshake_prefix() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    out = p.send(C("HELLO"))
    assert out == C("AUTH", UP_PW)
    p.reply(b"+OK\r\n")
    assert p.sent() == C("HELLO")


def test_hello_with_db_uses_auth_select_then_hello() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW, 2))
    out = p.send(C("HELLO", "3"))
    assert out == C("AUTH", UP_PW) + C("SELECT", "2")
    assert p.reply(b"+OK\r\n+OK\r\n") == b"" and p.sent() == C("HELLO", "3")
    assert p.reply(b"%0\r\n") == b"%0\r\n"
    assert p.s.protocol == 3


def test_reset_reauthenticates_upstream() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    p.send(C("PING"))
    p.reply(b"+OK\r\n")
    p.reply(b"+PONG\r\n")
    assert p.send(C("RESET")) == C("RESET")
    p.reply(b"+RESET\r\n")
    assert p.send(C("GET", "a")) == C("AUTH", UP_PW)
    assert p.reply(b"+OK\r\n") == b"" and p.sent() == C("GET", "a")
    assert p.reply(b"$-1\r\n") == b"$-1\r\n"
    assert p.upstream()[("respmeter", "auth")] == 2


def test_reset_before_anything_is_local() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    assert p.send(C("RESET")) == b""
    assert p.got() == b"+RESET\r\n"
    assert p.upstream() == {}


def test_upstream_auth_error_is_reported_without_the_secret() -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW))
    assert p.send(C("GET", "a"), C("SET", "b", "1")) == C("AUTH", UP_PW)
    got = p.reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    # fail closed: the client sees an error for each command, not a hang, and nothing of its
    # goes upstream (a server that needs no password would have run it)
    assert got == b"-ERR upstream rejected the proxy's credentials\r\n" * 2
    assert p.sent() == b"" and p.client_closed
    assert p.auth_errors == ["WRONGPASS invalid username-password pair or user is disabled."]
    assert all(UP_PW not in e for e in p.auth_errors)


def test_no_upstream_credentials_and_no_users_is_transparent() -> None:
    g = Gate(verifier=None, upstream_auth=UpstreamAuth(None, None))
    assert g.upstream_auth is None and not g.intercept_auth


# ---------------------------------------------------------------------------------------------
# identity order: user, listener, SETNAME, anonymous
# ---------------------------------------------------------------------------------------------


def test_identity_order() -> None:
    stats = Stats()
    # anonymous, then SETNAME
    a = Play(verifier=False, up=UpstreamAuth(None, UP_PW), stats=stats)
    assert a.s.client == "anonymous"
    a.send(C("CLIENT", "SETNAME", "web"))
    a.reply(b"+OK\r\n+OK\r\n")
    assert a.s.client == "web"
    # the listener name beats SETNAME
    b = Play(verifier=False, up=UpstreamAuth(None, UP_PW), listener="celery", stats=stats)
    assert b.s.client == "celery"
    b.send(C("CLIENT", "SETNAME", "web"))
    b.reply(b"+OK\r\n+OK\r\n")
    assert b.s.client == "celery"
    # the user beats the listener
    c = Play(listener="celery", stats=stats)
    assert c.s.client == "celery"
    c.send(C("AUTH", "alice", ALICE_PW))
    assert c.s.client == "billing"
    c.send(C("CLIENT", "SETNAME", "web"))
    c.reply(b"+OK\r\n")
    assert c.s.client == "billing"
    # RESET logs the user out, as on Redis: the listener name is the identity again, and the
    # client must authenticate before anything else reaches the upstream
    c.send(C("RESET"))
    c.reply(b"+RESET\r\n")
    assert c.s.client == "celery"
    assert not c.s.authed
    assert c.send(C("GET", "k")) == b""


# ---------------------------------------------------------------------------------------------
# the failed-login budget of a source address
# ---------------------------------------------------------------------------------------------


def test_failure_budget_is_a_token_bucket() -> None:
    t = Timers()
    th = FailureThrottle(burst=10, per=5.0, clock=lambda: t.now)
    for _ in range(10):
        assert th.begin("a") == 0
        th.end("a", failed=True)
    assert th.begin("a") == pytest.approx(5.0)  # the 11th waits for a refill
    assert th.begin("b") == 0  # per address
    th.end("b", failed=True)
    t.now += 4.9
    assert th.begin("a") == pytest.approx(0.1)
    t.now += 0.1
    assert th.begin("a") == 0  # one failure every 5 s
    th.end("a", failed=True)
    assert th.begin("a") == pytest.approx(5.0)
    t.now += 50
    assert th.left("a") == 10  # full again after 50 quiet seconds
    for _ in range(10):
        assert th.begin("a") == 0
        th.end("a", failed=True)
    assert th.begin("a") > 0


def test_a_success_gives_back_only_its_own_unit() -> None:
    """Issue 10: one valid account logging in between guesses must not restore the budget."""
    t = Timers()
    th = FailureThrottle(burst=10, per=5.0, clock=lambda: t.now)
    for _ in range(9):
        assert th.begin("a") == 0
        th.end("a", failed=True)
    for _ in range(50):  # a valid login between every guess
        assert th.begin("a") == 0
        th.end("a", failed=False)
        assert th.left("a") == pytest.approx(1.0)
    assert th.begin("a") == 0
    th.end("a", failed=True)
    assert th.begin("a") == pytest.approx(5.0)  # the valid logins gave nothing back


def test_running_checks_hold_budget() -> None:
    """Parallel connections cannot run more checks than the failures the address has left."""
    t = Timers()
    th = FailureThrottle(burst=10, per=5.0, clock=lambda: t.now)
    for _ in range(10):
        assert th.begin("a") == 0
    assert th.begin("a") == pytest.approx(5.0)
    th.end("a", failed=False)  # one check succeeded: its unit is free again
    assert th.begin("a") == 0
    for _ in range(10):
        th.end("a", failed=True)
    assert th.left("a") == pytest.approx(0.0)


def test_failure_budget_memory_is_bounded() -> None:
    t = Timers()
    th = FailureThrottle(burst=2, per=1.0, clock=lambda: t.now, max_addresses=100)
    for i in range(1000):
        th.begin(f"10.0.{i // 256}.{i % 256}")
        th.end(f"10.0.{i // 256}.{i % 256}", failed=True)
    assert len(th._state) <= 100
    th.begin("x")
    th.end("x", failed=False)
    assert "x" not in th._state  # a full, idle budget is not kept


def _offload_gate(t: Timers) -> tuple[Gate, list]:
    jobs: list = []
    g = Gate(verifier=Verifier(users(), lambda fn, done: jobs.append((fn, done))), call_later=t.call_later,
             clock=lambda: t.now)
    return g, jobs


def _run_jobs(jobs: list) -> None:
    while jobs:
        fn, done = jobs.pop(0)
        done(fn())


def test_guesses_past_the_budget_wait_before_any_hashing() -> None:
    t = Timers()
    g, jobs = _offload_gate(t)
    plays = [Play(gate=g, timers=t) for _ in range(12)]  # parallel connections, one address
    for i, p in enumerate(plays):
        p.send(C("AUTH", "alice", f"guess-{i}"))
    assert len(jobs) == 10  # the 11th and 12th hash nothing yet
    assert all(p.got() == b"" for p in plays)
    _run_jobs(jobs)
    assert [b"".join(p.to_client) for p in plays[:10]] == [WRONGPASS] * 10
    assert plays[10].to_client == [] and plays[11].to_client == [] and jobs == []
    t.advance(5.01)
    assert len(jobs) == 1  # one more check every 5 s, first come first served
    _run_jobs(jobs)
    assert b"".join(plays[10].to_client) == WRONGPASS and plays[11].to_client == []
    t.advance(5.01)
    _run_jobs(jobs)
    assert b"".join(plays[11].to_client) == WRONGPASS


def test_a_valid_login_between_guesses_does_not_reset_the_budget() -> None:
    t = Timers()
    g, jobs = _offload_gate(t)
    guesser = Play(gate=g, timers=t)
    answered = 0
    for i in range(30):
        ok = Play(gate=g, timers=t)
        ok.send(C("AUTH", "alice", ALICE_PW))
        _run_jobs(jobs)
        guesser.to_client.clear()
        guesser.s.client_data(C("AUTH", "default", f"guess-{i}"))
        _run_jobs(jobs)
        answered += guesser.to_client.count(WRONGPASS)
    assert answered == 10  # the burst, and then the guesses wait
    assert guesser.s.held


def test_a_client_leaving_during_its_check_still_spends_its_unit() -> None:
    t = Timers()
    g, jobs = _offload_gate(t)
    for i in range(10):
        p = Play(gate=g, timers=t)
        p.send(C("AUTH", "alice", f"guess-{i}"))
        p.s.client_closed()  # gone before the answer could tell it anything
    _run_jobs(jobs)
    assert g.throttle.left("10.0.0.7") == pytest.approx(0.0)
    late = Play(gate=g, timers=t)
    late.send(C("AUTH", "alice", "guess-late"))
    assert jobs == [] and late.got() == b""


def test_parked_clients_that_leave_are_forgotten_and_successes_wake_the_next() -> None:
    t = Timers()
    g, jobs = _offload_gate(t)
    holders = [Play(gate=g, timers=t) for _ in range(10)]
    for p in holders:
        p.send(C("AUTH", "alice", ALICE_PW))  # ten checks running: the budget is held
    assert len(jobs) == 1  # one hash for the ten identical pairs
    gone, waiting = Play(gate=g, timers=t), Play(gate=g, timers=t)
    gone.send(C("AUTH", "alice", "guess-a"))
    waiting.send(C("AUTH", "alice", "guess-b"))
    gone.s.client_closed()
    fn, done = jobs.pop()
    done(fn())  # the ten succeed: their units come back and wake the waiting client
    assert all(b"".join(p.to_client) == b"+OK\r\n" for p in holders)
    assert len(jobs) == 1 and gone.to_client == []
    _run_jobs(jobs)
    assert b"".join(waiting.to_client) == WRONGPASS
    assert not g._parked and not g._checking


def test_a_known_wrong_pair_is_answered_at_once_and_costs_nothing() -> None:
    """A careless client retrying the same wrong password learns nothing new: no budget, no hash."""
    t = Timers()
    g, jobs = _offload_gate(t)
    p = Play(gate=g, timers=t)
    p.send(C("AUTH", "alice", "stale-password"))
    _run_jobs(jobs)
    assert b"".join(p.to_client) == WRONGPASS
    for _ in range(100):
        assert p.send(C("AUTH", "alice", "stale-password")) == b""
        assert p.got() == WRONGPASS and jobs == []
    assert g.throttle.left("10.0.0.7") == pytest.approx(9.0)


def test_parked_login_survives_a_timer_firing_early() -> None:
    """Real timers may fire a hair before the deadline the gate computed with its own clock
    (uvloop rounds to milliseconds). The held client must still get its answer."""
    t = Timers()
    g = Gate(verifier=Verifier(users()), call_later=t.call_later, clock=lambda: t.now)
    p = Play(gate=g, timers=t)
    for i in range(10):
        p.send(C("AUTH", "alice", f"wrong-{i}"))
        assert p.got() == WRONGPASS
    p.send(C("AUTH", "alice", "wrong-10"))
    assert p.got() == b"" and p.s.held
    assert len(t.pending) == 1
    when, fn = t.pending.pop()
    t.now = when - 0.0015  # the timer fires 1.5 ms early
    fn()
    if not p.to_client:
        assert t.pending, "held AUTH has no timer left: the client would hang forever"
        t.advance(0.01)
    assert b"".join(p.to_client) == WRONGPASS


def test_correct_password_after_the_budget_is_spent_waits_too() -> None:
    """Past the budget nothing is checked, so a correct password cannot be told apart either."""
    t = Timers()
    g = Gate(verifier=Verifier(users()), call_later=t.call_later, clock=lambda: t.now)
    p = Play(gate=g, timers=t)
    for i in range(10):
        p.send(C("AUTH", "alice", f"wrong-{i}"))
    p.send(C("AUTH", "alice", ALICE_PW), C("PING"))
    assert p.got() == b""
    t.advance(5.01)
    assert b"".join(p.to_client) == b"+OK\r\n"  # checked once the budget allows, then accepted
    assert b"".join(p.to_upstream) == C("PING")
    assert p.s.authed and p.s.client == "billing"


# ---------------------------------------------------------------------------------------------
# the verifier and the users file
# ---------------------------------------------------------------------------------------------


def test_verifier_offloads_and_caches() -> None:
    jobs = []

    def offload(fn, done):  # noqa: ANN001
        jobs.append((fn, done))

    v = Verifier(users(), offload)
    woke = []
    assert v.check(b"alice", ALICE_PW, lambda: woke.append(1)) is None
    assert v.check(b"alice", ALICE_PW, lambda: woke.append(2)) is None  # joins the running check
    assert len(jobs) == 1
    fn, done = jobs.pop()
    done(fn())
    assert sorted(woke) == [1, 2]
    assert v.check(b"alice", ALICE_PW, lambda: None) is True
    assert not jobs
    # an unknown user costs a hash like a wrong password (no timing difference), and fails
    assert v.check(b"nobody", ALICE_PW, lambda: None) is None
    fn, done = jobs.pop()
    done(fn())
    assert v.check(b"nobody", ALICE_PW, lambda: None) is False
    # the plain password is not kept anywhere in the verifier
    assert ALICE_PW not in repr(vars(v)).encode()


def test_gate_waits_for_offloaded_check() -> None:
    jobs = []
    t = Timers()
    g = Gate(verifier=Verifier(users(), lambda fn, done: jobs.append((fn, done))), call_later=t.call_later, clock=lambda: t.now)
    p = Play(gate=g, timers=t)
    p.send(C("AUTH", "alice", ALICE_PW), C("GET", "a"))
    assert p.got() == b"" and p.to_upstream == []
    fn, done = jobs.pop()
    done(fn())
    assert b"".join(p.to_client) == b"+OK\r\n"
    assert b"".join(p.to_upstream) == C("GET", "a")


def test_hash_roundtrip_and_format() -> None:
    h = _hash(ALICE_PW)
    assert check_hash_format(h) is None
    assert verify_hash(ALICE_PW, h)
    assert not verify_hash(b"x", h)
    assert not verify_hash(ALICE_PW, "plain-text")
    assert ALICE_PW.decode() not in h
    assert check_hash_format("hunter2") is not None


def test_parse_users_errors_never_echo_hashes() -> None:
    good = {"users": {"a": {"password_hash": _hash(ALICE_PW), "label": "L"}}}
    assert parse_users(good, "f")["a"].label == "L"
    assert parse_users({"users": {"b": {"password_hash": _hash(ALICE_PW)}}}, "f")["b"].label == "b"
    for bad in (
        {"users": {"a": {"password_hash": "Pl41nT3xt-Pw"}}},
        {"users": {"a": {"password": "Pl41nT3xt-Pw"}}},
        {"users": {"a": {"password_hash": _hash(ALICE_PW), "label": ""}}},
        {"users": "Pl41nT3xt-Pw"},
    ):
        with pytest.raises(AuthConfigError) as ei:
            parse_users(bad, "f")
        assert "Pl41nT3xt-Pw" not in str(ei.value)


# ---------------------------------------------------------------------------------------------
# upstream quota errors
# ---------------------------------------------------------------------------------------------

QUOTA = (
    b"-ERR max requests limit exceeded. Limit: 500000, Usage: 500000. See "
    b"https://upstash.com/docs/redis/troubleshooting/max_requests_limit for details\r\n"
)
DAILY = b"-ERR max daily request limit exceeded. Limit: 10000, Usage: 10000. See https://upstash.com\r\n"


@pytest.mark.parametrize("with_auth", [False, True])
def test_quota_errors_counted(with_auth: bool) -> None:
    p = Play(verifier=False, up=UpstreamAuth(None, UP_PW) if with_auth else None)
    seen: list[str] = []
    p.stats.on_quota = seen.append
    p.send(C("GET", "a"), C("GET", "b"), C("GET", "c"))
    prefix = b"+OK\r\n" if with_auth else b""  # with credentials: the slow (internal) path
    got = p.reply(prefix + QUOTA + b"-ERR max requests is a fine key name\r\n" + DAILY)
    assert got == QUOTA + b"-ERR max requests is a fine key name\r\n" + DAILY
    assert p.stats.upstream_quota_exceeded == 2
    assert seen[0].startswith("ERR max requests limit exceeded. Limit: 500000")
    assert seen[1].startswith("ERR max daily request limit exceeded")
    # a value that merely contains the text is no error
    p.send(C("GET", "d"))
    p.reply(b"$%d\r\n%s\r\n" % (len(QUOTA) - 2, QUOTA[:-2]))
    assert p.stats.upstream_quota_exceeded == 2


def test_quota_error_split_across_reads() -> None:
    p = Play(verifier=False, up=None)
    p.stats.on_quota = lambda _t: None
    p.send(C("GET", "a"))
    for i in range(0, len(QUOTA), 7):
        p.reply(QUOTA[i : i + 7])
    assert p.stats.upstream_quota_exceeded == 1


def test_failure_budget_is_per_ipv4_address_and_per_ipv6_64() -> None:
    from proxy.gate import budget_key

    assert budget_key("10.0.0.7") == "10.0.0.7"
    assert budget_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert budget_key("2001:db8:1:2:aaaa::1") == budget_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert budget_key("2001:db8:1:3::1") != budget_key("2001:db8:1:2::1")
    assert budget_key("unix") == "unix"
    t = Timers()
    g = Gate(verifier=Verifier(users()), call_later=t.call_later, clock=lambda: t.now)
    for i in range(10):  # a host rotating through its /64 spends one budget
        p = Play(gate=g, timers=t, peer=f"('2001:db8::{i + 1:x}', 40000, 0, 0)")
        p.send(C("AUTH", "alice", f"wrong-{i}"))
        assert p.got() == WRONGPASS
    p = Play(gate=g, timers=t, peer="('2001:db8::ff', 40000, 0, 0)")
    p.send(C("AUTH", "alice", "wrong-x"))
    assert p.got() == b"" and p.s.held
