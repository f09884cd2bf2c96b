"""Caps and rate limits with an injected clock and a real SQLite state directory (no sockets)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.configfile import load_config, parse_client_cap_flag, parse_rate_limit_flag
from proxy.gate import Gate
from proxy.limits import CapConfig, Limits, LimitsConfigError, RateRule, parse_rate
from proxy.metrics import Stats
from proxy.resp import encode_command
from proxy.session import Session
from proxy.store import Store

pytestmark = pytest.mark.usefixtures("hot_path")

T0 = dt.datetime(2026, 11, 25, 23, 59, 0, tzinfo=dt.timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Timers:
    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def __call__(self, delay: float, fn) -> None:  # noqa: ANN001
        self.calls.append((delay, fn))

    def fire(self) -> None:
        calls, self.calls = self.calls, []
        for _, fn in calls:
            fn()  # type: ignore[operator]


class Rig:
    """A Limits over a real store, and sessions to drive through it."""

    def __init__(self, tmp: Path, caps: CapConfig, rules: list[RateRule] = (), clock: Clock | None = None, owner: str | None = None) -> None:  # noqa: B006
        self.clock = clock or Clock()
        self.timers = Timers()
        self.stats = Stats()
        self.store = Store(tmp, clock=self.clock, owner=owner)
        self.limits = Limits(caps, list(rules), self.store, clock=self.clock, call_later=self.timers, stats=self.stats)
        self.gate = Gate(limits=self.limits, call_later=self.timers, clock=self.clock)

    def session(self) -> "Conn":
        return Conn(self)


class Conn:
    def __init__(self, rig: Rig) -> None:
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.s = Session(rig.stats, self.to_client.append, lambda: None, clock=rig.clock, policy=rig.gate)
        self.s.upstream_connected(self.to_upstream.append, lambda: None)

    def send(self, *cmds: list[bytes]) -> bytes:
        self.to_upstream.clear()
        self.s.client_data(b"".join(encode_command(c) for c in cmds))
        return b"".join(self.to_upstream)

    def client_out(self) -> bytes:
        out = b"".join(self.to_client)
        self.to_client.clear()
        return out


def forwarded(data: bytes) -> int:
    return data.count(b"*2\r\n$4\r\nINCR")


def test_pipeline_crossing_the_cap(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=10))
    c = rig.session()
    up = c.send(*([[b"INCR", b"k"]] * 15))
    assert forwarded(up) == 10
    # the rejections wait behind the 10 replies, then come in order
    assert c.client_out() == b""
    c.s.upstream_data(b"".join(b":%d\r\n" % i for i in range(1, 11)))
    out = c.client_out()
    assert out.startswith(b":1\r\n")
    tail = out.split(b":10\r\n", 1)[1]
    assert tail.count(b"-ERR respmeter: daily cap of 10 commands reached, resets at 2026-11-26T00:00:00+00:00\r\n") == 5
    assert rig.limits.used("daily") == 10
    assert rig.stats.commands[("anonymous", "incr", "rejected")] == 5


def test_caps_shared_by_sessions_and_processes(tmp_path: Path) -> None:
    a = Rig(tmp_path, CapConfig(daily=100), owner="host:1:a")
    b = Rig(tmp_path, CapConfig(daily=100), owner="host:2:b", clock=a.clock)
    total = 0
    for _ in range(30):
        for rig in (a, b):
            total += forwarded(rig.session().send(*([[b"INCR", b"k"]] * 7)))
    assert total == 100
    a.limits.flush()
    b.limits.flush()
    a.limits.close()  # a clean exit gives back what it did not spend
    assert a.store.used("day:2026-11-25", "") <= 100


def test_crash_never_undercounts(tmp_path: Path) -> None:
    clock = Clock()
    first = Rig(tmp_path, CapConfig(daily=1000), clock=clock, owner="otherhost:999999:x")
    sent = forwarded(first.session().send(*([[b"INCR", b"k"]] * 40)))
    assert sent == 40
    # no flush, no close: the process "dies". Another process starts on the same state.
    clock.t += 20  # the dead owner's heartbeat is now stale (same day)
    second = Rig(tmp_path, CapConfig(daily=1000), clock=clock)
    assert second.limits.used("daily") >= 40  # counts continue from at least where they were
    # and the budget the dead process reserved is never given out again
    allowed = 0
    for _ in range(200):
        allowed += forwarded(second.session().send(*([[b"INCR", b"k"]] * 10)))
    assert allowed + 40 <= 1000
    assert allowed >= 1000 - 40 - 64  # at most one unspent block is lost


def test_restart_keeps_counts(tmp_path: Path) -> None:
    clock = Clock()
    rig = Rig(tmp_path, CapConfig(daily=50, monthly=1000), clock=clock)
    forwarded(rig.session().send(*([[b"INCR", b"k"]] * 30)))
    rig.limits.close()
    rig2 = Rig(tmp_path, CapConfig(daily=50, monthly=1000), clock=clock)
    assert rig2.limits.used("daily") == 30
    assert forwarded(rig2.session().send(*([[b"INCR", b"k"]] * 30))) == 20


def test_day_rollover_resets_daily_keeps_monthly(tmp_path: Path) -> None:
    clock = Clock(dt.datetime(2026, 11, 25, 23, 59, 30, tzinfo=dt.timezone.utc).timestamp())
    rig = Rig(tmp_path, CapConfig(daily=20, monthly=100), clock=clock)
    c = rig.session()
    assert forwarded(c.send(*([[b"INCR", b"k"]] * 25))) == 20
    clock.t += 60  # 2026-11-26 00:00:30
    assert forwarded(c.send(*([[b"INCR", b"k"]] * 25))) == 20
    assert rig.limits.used("daily") == 20
    assert rig.limits.used("monthly") == 40
    snap = rig.limits.snapshot()
    assert snap["windows"]["daily"]["id"] == "2026-11-26"
    assert snap["windows"]["monthly"]["used"] == 40
    # month rollover resets both
    clock.t = dt.datetime(2026, 12, 1, 0, 0, 5, tzinfo=dt.timezone.utc).timestamp()
    assert forwarded(c.send(*([[b"INCR", b"k"]] * 5))) == 5
    assert rig.limits.used("monthly") == 5


def test_windows_follow_the_timezone(tmp_path: Path) -> None:
    clock = Clock(dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.timezone.utc).timestamp())
    rig = Rig(tmp_path, CapConfig(daily=10, timezone="Europe/Paris"), clock=clock)
    # 23:30 UTC is 00:30 on the 26th in Paris
    assert rig.limits.win_ids["daily"] == "day:2026-11-26"
    assert rig.limits.reset_iso("daily") == "2026-11-27T00:00:00+01:00"


def test_per_client_caps(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=100, clients={"worker": {"daily": 5}}))
    w = rig.session()
    w.s.set_user("worker")
    other = rig.session()
    assert forwarded(w.send(*([[b"INCR", b"k"]] * 8))) == 5
    assert forwarded(other.send(*([[b"INCR", b"k"]] * 8))) == 8
    w.s.upstream_data(b":1\r\n" * 5)
    assert b"daily cap of 5 commands for client worker reached" in w.client_out()


def test_transaction_is_never_half_applied(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=4))
    c = rig.session()
    up = c.send([b"MULTI"], [b"INCR", b"a"], [b"INCR", b"b"], [b"INCR", b"c"], [b"EXEC"])
    # MULTI + its reserved EXEC slot + INCR a + INCR b = 4: INCR c is refused, EXEC becomes DISCARD
    assert up.startswith(encode_command([b"MULTI"]))
    assert encode_command([b"EXEC"]) not in up
    assert up.endswith(encode_command([b"DISCARD"]))
    c.s.upstream_data(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n")
    out = c.client_out()
    assert out.startswith(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n-ERR respmeter: daily cap")
    assert out.endswith(b"-EXECABORT Transaction discarded: respmeter cap reached while queueing\r\n")
    assert not c.s.pending and not c.s.in_multi
    assert rig.limits.used("daily") == 4


def test_transaction_within_budget_runs(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=4))
    c = rig.session()
    up = c.send([b"MULTI"], [b"INCR", b"a"], [b"INCR", b"b"], [b"EXEC"])
    assert up.endswith(encode_command([b"EXEC"]))
    c.s.upstream_data(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n")
    assert c.client_out().endswith(b"*2\r\n:1\r\n:1\r\n")
    assert rig.limits.used("daily") == 4


def test_on_cap_idle_blocking_pop(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=1, on_cap="idle"))
    c = rig.session()
    c.send([b"INCR", b"k"])
    c.s.upstream_data(b":1\r\n")
    c.client_out()
    up = c.send([b"BRPOP", b"q", b"5"], [b"GET", b"x"])
    assert up == b""
    assert c.client_out() == b""  # held, not an error
    assert rig.timers.calls and rig.timers.calls[0][0] == pytest.approx(5.0)
    rig.clock.t += 5
    rig.timers.fire()
    out = c.client_out()
    assert out.startswith(b"*-1\r\n")  # the empty reply of a timed-out BRPOP
    assert b"daily cap of 1 commands reached" in out  # GET still gets the cap error
    assert rig.limits.used("daily") == 1


def test_rate_limit_delay_keeps_order_and_bounds_the_queue(tmp_path: Path) -> None:
    rule = RateRule("polling", parse_rate("6/min"), burst=1, client="*", command="brpop", action="delay", max_queue=3)
    rig = Rig(tmp_path, CapConfig(), [rule])
    c = rig.session()
    assert c.send([b"BRPOP", b"q", b"1"]) == encode_command([b"BRPOP", b"q", b"1"])
    assert c.send([b"BRPOP", b"q", b"1"], [b"GET", b"a"]) == b""  # held; GET waits behind it
    assert rig.limits.throttled[("polling", "delay")] == 1
    assert rig.timers.calls[-1][0] == pytest.approx(10.0)
    c.send([b"GET", b"b"], [b"GET", b"c"], [b"GET", b"d"])  # queue of 3 is full: these are refused
    rig.clock.t += 10
    rig.timers.fire()
    assert c.to_upstream == [encode_command([b"BRPOP", b"q", b"1"]) + encode_command([b"GET", b"a"]) + encode_command([b"GET", b"b"])]
    c.s.upstream_data(b"*-1\r\n*-1\r\n$-1\r\n$-1\r\n")
    out = c.client_out()
    assert out.count(b"rate limit polling exceeded (queue full)") == 2
    # other clients (not matched by command) are unaffected
    other = rig.session()
    assert other.send([b"GET", b"z"]) == encode_command([b"GET", b"z"])


def test_rate_limit_reject(tmp_path: Path) -> None:
    rule = RateRule("strict", parse_rate("1/s"), burst=2, command="get", action="reject")
    rig = Rig(tmp_path, CapConfig(), [rule])
    c = rig.session()
    up = c.send(*([[b"GET", b"a"]] * 4))
    assert up.count(b"GET") == 2
    c.s.upstream_data(b"$-1\r\n$-1\r\n")
    assert c.client_out().count(b"-ERR respmeter: rate limit strict exceeded\r\n") == 2
    assert rig.limits.throttled[("strict", "reject")] == 2


def test_parse_rate_and_flags() -> None:
    assert parse_rate("600/min") == pytest.approx(10)
    assert parse_rate("10/s") == 10
    with pytest.raises(LimitsConfigError):
        parse_rate("10/fortnight")
    r = parse_rate_limit_flag("name=p,client=celery,command=brpop,rate=6/min,burst=2,action=delay,max_queue=5")
    assert (r.name, r.client, r.command, r.burst, r.max_queue) == ("p", "celery", "brpop", 2.0, 5)
    assert parse_client_cap_flag("web:monthly=100") == ("web", "monthly", 100)
    with pytest.raises(LimitsConfigError):
        parse_client_cap_flag("web=100")


def test_check_config_reports_every_problem_of_one_entry(tmp_path: Path) -> None:
    """Several problems in one user or one rule are all reported, not just the first."""
    f = tmp_path / "bad.toml"
    f.write_text(
        textwrap.dedent(
            """\
            [users.alice]
            password_hash = "nope"
            colour = "blue"

            [[rate_limit]]
            rate = "fast"
            burst = 0
            action = "maybe"
            max_queue = -1
            """
        )
    )
    text = "\n".join(load_config(str(f)).problems)
    assert f"{f}:2: users.alice.password_hash: password_hash must come from `respmeter hash-password`" in text
    assert f"{f}:3: users.alice.colour: unknown key" in text
    assert "nope" not in text  # never echo what was given as a hash
    assert f"{f}:6: rate_limit[0].rate:" in text
    assert f"{f}:7: rate_limit[0].burst: must be a number >= 1" in text
    assert f"{f}:8: rate_limit[0].action:" in text
    assert f"{f}:9: rate_limit[0].max_queue:" in text
    assert text.count("\n") == 5


def test_check_config_reports_every_problem_with_its_place(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(
        textwrap.dedent(
            """\
            [proxy]
            listen = "127.0.0.1:6380"
            upstreem = "redis://x"

            [caps]
            daily = -5
            timezone = "Mars/Olympus"

            [caps.clients.celery]
            weekly = 3

            [[rate_limit]]
            name = "a"
            rate = "fast"

            [[rate_limit]]
            name = "b"
            rate = "1/s"
            colour = "blue"

            [state]
            url = "redis://:pw@127.0.0.1:99999"
            """
        )
    )
    problems = load_config(str(f)).problems
    text = "\n".join(problems)
    assert f"{f}:22: state.url: bad port" in text  # (checked as run checks it)
    assert f"{f}:3: proxy.upstreem: unknown option" in text
    assert f"{f}:6: caps.daily: must be a positive whole number" in text
    assert f"{f}:7: caps.timezone: unknown timezone" in text
    assert f"{f}:10: caps.clients.celery.weekly: unknown key" in text
    assert f"{f}:14: rate_limit[0].rate:" in text
    assert f"{f}:19: rate_limit[1].colour: unknown key" in text
    assert len(problems) == 7
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines), problems  # in the file's order
    # the CLI prints them all and exits 1
    r = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(f)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 1
    assert r.stdout.count("\n") == 7


def test_good_config_and_precedence(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text(
        textwrap.dedent(
            """\
            [proxy]
            listen = ["celery=127.0.0.1:6380"]
            admin = "127.0.0.1:9999"

            [caps]
            daily = 10000
            monthly = 500000
            on_cap = "idle"

            [[rate_limit]]
            name = "polling"
            client = "celery"
            command = "brpop"
            rate = "6/min"
            """
        )
    )
    cfg = load_config(str(f))
    assert cfg.problems == []
    r = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(f)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    from proxy.cli import RUN_OPTIONS, build_parser, resolve
    from proxy.configfile import build_caps, file_layer

    parser = build_parser()
    ns = parser.parse_args(["run", "--daily-cap", "7"])
    opts = resolve(RUN_OPTIONS, ns, {"RESPMETER_ADMIN": "127.0.0.1:1234"}, parser, file_layer(cfg))
    assert opts["admin"] == "127.0.0.1:1234"  # env beats file
    assert opts["listen"] == ["celery=127.0.0.1:6380"]  # file beats default
    caps = build_caps(opts, cfg.caps)
    assert (caps.daily, caps.monthly, caps.on_cap) == (7, 500000, "idle")  # flag beats file


def test_state_dir_default_respects_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from proxy.store import default_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "respmeter"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert str(default_state_dir()).endswith(os.path.join(".local", "state", "respmeter"))


def test_on_cap_idle_answers_health_checks_and_broadcasts_locally(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=1, on_cap="idle"))
    c = rig.session()
    c.send([b"INCR", b"k"])
    c.s.upstream_data(b":1\r\n")
    c.client_out()
    up = c.send([b"PING"], [b"PING", b"redis-py-health-check"], [b"PUBLISH", b"/0.celeryev/worker.heartbeat", b"{}"], [b"SET", b"a", b"1"])
    assert up == b""  # nothing reaches the upstream
    out = c.client_out()
    assert out.startswith(b"+PONG\r\n$21\r\nredis-py-health-check\r\n:0\r\n-ERR respmeter: daily cap of 1")
    assert rig.stats.commands[("anonymous", "ping", "local")] == 2
    assert rig.stats.commands[("anonymous", "publish", "local")] == 1
    assert rig.limits.used("daily") == 1
    # with on_cap = "error" the same PING is refused
    rig2 = Rig(tmp_path / "e", CapConfig(daily=1))
    c2 = rig2.session()
    c2.send([b"INCR", b"k"])
    c2.s.upstream_data(b":1\r\n")
    c2.client_out()
    assert c2.send([b"PING"]) == b""
    assert c2.client_out().startswith(b"-ERR respmeter: daily cap")


def test_unwritable_state_fails_closed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=100))

    def broken(wants):  # noqa: ANN001, ANN202
        import sqlite3

        raise sqlite3.OperationalError("database is locked")

    rig.store.reserve = broken  # type: ignore[method-assign]
    c = rig.session()
    assert c.send([b"INCR", b"k"]) == b""  # not sent: its budget could not be recorded
    out = c.client_out()
    assert out.startswith(b"-ERR respmeter: usage state unavailable (database is locked)")
    assert rig.stats.rejections["state_unavailable"] == 1


def test_rate_limit_queue_bound_applies_to_pipelines_and_counts_each_delay_once(tmp_path: Path) -> None:
    rule = RateRule("polling", parse_rate("6/min"), burst=1, command="brpop", action="delay", max_queue=2)
    rig = Rig(tmp_path, CapConfig(), [rule])
    c = rig.session()
    c.send([b"BRPOP", b"q", b"1"])  # takes the only token
    # one pipeline: the held BRPOP and four GETs behind it; only max_queue (2) may wait
    assert c.send([b"BRPOP", b"q", b"1"], *[[b"GET", b"k%d" % i] for i in range(4)]) == b""
    for _ in range(3):  # a timer that fires early looks at the held command again
        rig.clock.t += 1
        rig.timers.fire()
    assert rig.limits.throttled[("polling", "delay")] == 1
    rig.clock.t += 10
    rig.timers.fire()
    assert c.to_upstream[-1] == encode_command([b"BRPOP", b"q", b"1"]) + encode_command([b"GET", b"k0"])
    c.s.upstream_data(b"*-1\r\n*-1\r\n$-1\r\n")
    assert c.client_out().count(b"rate limit polling exceeded (queue full)") == 3
    assert rig.stats.rejections["rate_limit_queue_full"] == 3


def test_quit_at_the_cap_is_answered(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CapConfig(daily=1))
    c = rig.session()
    c.send([b"INCR", b"k"])
    c.s.upstream_data(b":1\r\n")
    c.client_out()
    assert c.send([b"QUIT"]) == b""
    assert c.client_out() == b"+OK\r\n"
    assert c.s.closed


def test_on_cap_idle_a_client_that_connected_at_the_cap_waits_for_the_reset(tmp_path: Path) -> None:
    """A connection the server never answered (it connected at the cap) is not refused under
    idle: its first real command waits for the window to reset, then goes. A connection that was
    already talking to the server keeps getting the cap error (see the tests above)."""
    rig = Rig(tmp_path, CapConfig(daily=2, on_cap="idle"))
    c = rig.session()
    c.send([b"INCR", b"k"], [b"INCR", b"k"])
    c.s.upstream_data(b":1\r\n:2\r\n")
    c.client_out()
    late = rig.session()
    assert late.send([b"SET", b"a", b"1"], [b"GET", b"a"]) == b""
    assert late.client_out() == b""  # held: no error, nothing sent
    (delay, _), = rig.timers.calls
    reset = rig.limits.bounds["daily"][1]
    assert delay == pytest.approx(reset - rig.clock.t, abs=0.01)
    rig.clock.t = reset + 1  # the next day: budget again
    rig.timers.fire()
    assert b"".join(late.to_upstream) == encode_command([b"SET", b"a", b"1"]) + encode_command([b"GET", b"a"])
    assert rig.limits.used("daily") == 2  # the new day's


def test_on_cap_idle_a_pipeline_that_crosses_the_cap_on_a_new_connection_gets_the_error(tmp_path: Path) -> None:
    """Under idle, only a connection that has sent nothing upstream waits for the reset. One that
    connected under the cap and crosses it inside its first pipeline (no reply has come back yet)
    has its leading commands forwarded and the rest refused, in order, as with on_cap error: it
    must not hang waiting for replies that would come only after midnight."""
    rig = Rig(tmp_path, CapConfig(daily=2, on_cap="idle"))
    c = rig.session()
    out = c.send([b"SET", b"a", b"1"], [b"SET", b"b", b"2"], [b"GET", b"a"], [b"GET", b"b"])
    assert out == encode_command([b"SET", b"a", b"1"]) + encode_command([b"SET", b"b", b"2"])
    assert rig.timers.calls == []  # nothing is held for the reset
    c.s.upstream_data(b"+OK\r\n+OK\r\n")
    replies = c.client_out()
    assert replies.startswith(b"+OK\r\n+OK\r\n-ERR respmeter: daily cap of 2"), replies
    assert replies.count(b"-ERR respmeter: daily cap") == 2


def test_cap_rejections_count_what_was_refused_only(tmp_path: Path) -> None:
    """respmeter_cap_rejections_total counts the commands refused at a cap, as
    respmeter_rejections_total{reason="cap"} does: not the PING and PUBLISH the proxy answers itself
    under idle, nor a command held for the reset (each time it is looked at again)."""
    rig = Rig(tmp_path, CapConfig(daily=1, on_cap="idle"))
    c = rig.session()
    c.send([b"INCR", b"k"])
    c.s.upstream_data(b":1\r\n")
    c.client_out()
    c.send([b"PING"], [b"PUBLISH", b"ch", b"m"])
    assert c.client_out() == b"+PONG\r\n:0\r\n"  # answered here: not refusals
    c.send([b"GET", b"k"], [b"GET", b"k"])
    assert c.client_out().count(b"-ERR respmeter: daily cap") == 2
    late = rig.session()  # connected at the cap: held for the reset, not refused
    late.send([b"GET", b"k"])
    rig.clock.t += 1
    rig.timers.fire()  # looked at again (still the same day): held again
    assert late.client_out() == b""
    assert rig.stats.cap_rejections == {"daily": 2}
    assert rig.stats.rejections["cap"] == 2
