"""Caps shared by several proxies through Redis (--state-url): exact against the upstream's own
counts, under concurrency, kill -9 and a state store that goes away."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import commandstats, commandstats_delta

from proxy.sharedstore import HEADROOM

CAP = 5000


def _hammer(proxy, clients: int, stop: threading.Event, refused: list[int]) -> list[threading.Thread]:
    """``clients`` pipelining clients on ``proxy``, until each sees the cap."""
    redis = pytest.importorskip("redis")

    def run() -> None:
        c = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=10)
        try:
            while not stop.is_set():
                p = c.pipeline(transaction=False)
                for _ in range(20):
                    p.incr("n")
                out = p.execute(raise_on_error=False)
                errs = [r for r in out if isinstance(r, Exception)]
                if errs:
                    refused.append(len(errs))
                    assert all("cap of 5000" in str(e) for e in errs), errs[:1]
                    return
        except (redis.ConnectionError, redis.TimeoutError):
            return  # (its proxy was killed)
        finally:
            c.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def _run_until_capped(proxies, kill: bool = False) -> list[int]:
    """20 pipelining clients on each proxy until each sees the cap; with ``kill``, the first two
    proxies are killed with -9 mid-run and started again (with 20 new clients each). The refusals."""
    stop = threading.Event()
    refused: list[int] = []
    threads = [t for p in proxies for t in _hammer(p, 20, stop, refused)]
    if kill:
        time.sleep(0.3)
        for p in proxies[:2]:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        for p in proxies[:2]:
            p.start()
        threads += [t for p in proxies[:2] for t in _hammer(p, 20, stop, refused)]
    for t in threads:
        t.join(60)
    stop.set()
    return refused


def _fleet(redis_factory, proxy_factory, n: int, extra=()):
    upstream = redis_factory()
    state = redis_factory()
    proxies = [proxy_factory(upstream, ["--state-url", state.url, "--daily-cap", str(CAP), *extra])
               for _ in range(n)]
    return upstream, state, proxies


def _executed(obs, before) -> int:
    delta = commandstats_delta(before, commandstats(obs))
    delta.pop("info", None)
    return sum(delta.values())


def test_three_proxies_share_one_daily_cap(redis_factory, proxy_factory):
    upstream, state, proxies = _fleet(redis_factory, proxy_factory, 3)
    obs = upstream.client()
    before = commandstats(obs)
    refused = _run_until_capped(proxies)
    executed = _executed(obs, before)
    # never more than the cap; less by at most the blocks the proxies still hold (cap/50 each)
    assert executed <= CAP
    assert executed >= CAP - 3 * 100, executed
    assert len(refused) == 60
    reserved = sum(int(state.client().get(k)) for k in state.client().keys("respmeter:total:day:*"))
    assert executed <= reserved <= CAP


def test_a_killed_proxy_loses_only_its_blocks(redis_factory, proxy_factory):
    upstream, state, proxies = _fleet(redis_factory, proxy_factory, 3)
    obs = upstream.client()
    before = commandstats(obs)
    _run_until_capped(proxies, kill=True)
    executed = _executed(obs, before)
    assert executed <= CAP
    # the killed proxies' unspent blocks count as used: undercount by at most those and the live ones
    assert executed >= CAP - 5 * 100, executed


def test_state_store_down_fails_closed_then_recovers(redis_factory, proxy_factory):
    upstream, state, proxies = _fleet(redis_factory, proxy_factory, 1)
    proxy = proxies[0]
    c = proxy.client()
    assert c.incr("x") == 1
    state.kill()
    t0 = time.monotonic()
    err = None
    while time.monotonic() - t0 < 10:
        try:
            c.incr("x")
        except Exception as exc:  # noqa: BLE001
            err = str(exc)
            break
        time.sleep(0.2)
    assert err is not None and "usage state unavailable" in err, err
    status, body = proxy.healthz()
    assert status == 503 and "refusing commands (--state-fail closed)" in body
    assert proxy.metric_sum("respmeter_rejections_total", by=("reason",)).get("state_unavailable", 0) >= 1


def test_state_fail_open_serves_only_the_budget_held(redis_factory, proxy_factory):
    upstream, state, proxies = _fleet(redis_factory, proxy_factory, 1, ["--state-fail", "open"])
    proxy = proxies[0]
    obs = upstream.client()
    c = proxy.client()
    c.incr("y")
    held = CAP  # what the proxy may still spend is at most what it reserved
    state.kill()
    before = commandstats(obs)
    served = 0
    for _ in range(400):
        try:
            c.incr("y")
            served += 1
        except Exception as exc:  # noqa: BLE001
            assert "usage state unavailable" in str(exc)
            break
    executed = _executed(obs, before)
    assert 0 < served < 400 and executed == served <= held
    status, body = proxy.healthz()
    assert status == 503 and "serving only the budget already held (--state-fail open)" in body


# the commands the state scripts run inside the server: listed by INFO commandstats, but nobody sent
# them and they are not billed (one EVAL is one command)
INSIDE = {"get", "set", "hget", "hset", "hexists", "hincrby", "expire", "hgetall"}


def _sent(obs, before) -> dict[str, int]:
    delta = commandstats_delta(before, commandstats(obs))
    delta.pop("info", None)
    return {k: v for k, v in delta.items() if k not in INSIDE}


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "kill-9"])
def test_state_url_upstream_pays_its_state_commands_from_the_cap(redis_factory, proxy_factory, kill):
    """--state-url upstream: three proxies keep their leases in the upstream itself. Their state
    commands are billed there, counted by the proxies exactly as the server does, and paid from
    the same daily cap: clients' and state commands together never pass it, with or without two
    of the proxies killed with -9 and started again."""
    upstream = redis_factory()
    obs = upstream.client()
    known = support.server_known_commands(obs)
    before = commandstats(obs)
    proxies = [proxy_factory(upstream, ["--state-url", "upstream", "--daily-cap", str(CAP)]) for _ in range(3)]
    _run_until_capped(proxies, kill=kill)
    sent = _sent(obs, before)
    assert sent.get("eval", 0) >= 3
    executed = sum(sent.values())
    assert executed <= CAP, sent
    # less by at most the blocks still held (cap/50 each, the killed ones' too), each instance's
    # spare for its next state call (2) and the headroom kept for new instances' first calls
    outstanding = (5 if kill else 3) * (100 + 2) + HEADROOM
    assert executed >= CAP - outstanding, sent
    if not kill:
        # what the proxies say they sent upstream, their state commands included, is what the
        # server executed, name by name (read again if a state call ran in between)
        for _ in range(5):
            server = _sent(obs, before)
            up: dict[str, int] = {}
            for p in proxies:
                for k, v in p.metric_sum("respmeter_upstream_commands_total").items():
                    up[k] = up.get(k, 0) + int(v)
            if server == _sent(obs, before):
                break
        support.assert_counts_match({k: v for k, v in up.items() if v}, server, known)
        # at the cap, a proxy whose spare cannot pay for another state call makes none
        evals = server.get("eval", 0)
        for p in proxies:
            c = p.client()
            for _ in range(30):
                with pytest.raises(Exception, match="cap of 5000"):
                    c.incr("n")
            c.close()
        assert _sent(obs, before).get("eval", 0) == evals
    keys = obs.keys("respmeter:total:day:*")
    assert len(keys) == 1 and executed <= int(obs.get(keys[0])) <= CAP


def test_new_instances_at_the_cap_pay_their_first_call_from_the_headroom(redis_factory, tmp_path):
    """A state store billed by the upstream: instances started after the cap is spent have no spare
    to pay their first call with; the headroom set aside pays it, so the total stays within the
    cap, and no block is granted from it."""
    from proxy.sharedstore import SharedStore, SyncRedis
    from proxy.store import Store

    state = redis_factory()

    def instance(name: str) -> SharedStore:
        st = SharedStore(SyncRedis((state.host, state.port)), Store(tmp_path / name), billed=True, instance=name)
        st.set_charged({"day:x": 200})
        return st

    early = instance("early")
    assert early.reserve([("day:x", "", 10, 200)]) == [10] and early.spare["day:x"] == early.spare_target
    first = instance("first")
    granted = 10
    calls = -1
    while first.link.sent != calls:  # until its spare cannot pay for another call
        calls = first.link.sent
        granted += first.reserve([("day:x", "", 50, 200)])[0]
    assert first.reserve([("day:x", "", 50, 200)]) == [0] and first.link.sent == calls
    r = state.client()
    assert granted <= 200 - HEADROOM
    # a restarted instance (same name) pays its first call from the spare it had kept
    boot = int(r.hget("respmeter:lease:day:x:", "~boot") or 0)
    assert instance("early").reserve([("day:x", "", 50, 200)]) == [0]
    assert int(r.hget("respmeter:lease:day:x:", "~boot") or 0) == boot
    # new instances have none: the headroom pays theirs
    late = [instance(f"late{i}") for i in range(HEADROOM)]
    assert all(st.reserve([("day:x", "", 50, 200)]) == [0] for st in late)
    assert int(r.get("respmeter:total:day:x:")) <= 200
    assert int(r.hget("respmeter:lease:day:x:", "~boot")) <= HEADROOM


def test_day_rollover_across_two_proxies_with_an_injected_clock(redis_factory, tmp_path):
    """Two proxies' Limits share a state Redis; the clock crosses midnight (in the cap's timezone):
    the new day starts at zero for both, the month keeps counting for both, and the windows' keys
    are apart (no race at midnight) and expire."""
    import datetime as dt

    from proxy.limits import CapConfig, Limits
    from proxy.sharedstore import SharedStore, SyncRedis
    from proxy.store import Store

    try:
        from test_limits import Clock, Conn, forwarded
    except ImportError:  # pragma: no cover
        from tests.test_limits import Clock, Conn, forwarded

    state = redis_factory()
    clock = Clock(dt.datetime(2026, 11, 25, 23, 59, 30, tzinfo=dt.timezone.utc).timestamp())

    class SharedRig:
        def __init__(self, name: str) -> None:
            from proxy.gate import Gate
            from proxy.metrics import Stats

            self.clock = clock
            self.timers = lambda delay, fn: None
            self.stats = Stats()
            local = Store(tmp_path / name, clock=clock, owner=f"host:{name}")
            self.store = SharedStore(SyncRedis((state.host, state.port)), local, clock=clock)
            self.limits = Limits(CapConfig(daily=30, monthly=100), [], self.store, clock=clock,
                                 call_later=self.timers, stats=self.stats)
            self.gate = Gate(limits=self.limits, call_later=self.timers, clock=clock)

    a, b = SharedRig("a"), SharedRig("b")
    ca, cb = Conn(a), Conn(b)
    day1 = forwarded(ca.send(*([[b"INCR", b"k"]] * 25))) + forwarded(cb.send(*([[b"INCR", b"k"]] * 25)))
    assert day1 == 30  # the two share the day's 30
    clock.t += 60  # 2026-11-26 00:00:30
    day2 = forwarded(ca.send(*([[b"INCR", b"k"]] * 25))) + forwarded(cb.send(*([[b"INCR", b"k"]] * 25)))
    assert day2 == 30
    for rig in (a, b):
        rig.limits.flush(release=True)
    clock.t += 61  # a's next push (every 60 s) reads the fleet's usage, b's included
    a.limits.flush()
    r = state.client()
    assert int(r.get("respmeter:total:day:2026-11-25:")) <= 30
    assert int(r.get("respmeter:total:day:2026-11-26:")) == 30
    assert int(r.get("respmeter:total:month:2026-11:")) == 60
    assert 0 < r.ttl("respmeter:total:day:2026-11-25:") <= 40 * 86400
    assert a.limits.used("monthly") == 60 and b.limits.used("daily") == 30


def test_report_against_the_fleet_names_sources_and_instances(redis_factory, proxy_factory):
    """Two proxies (instances "web" and "worker") share a state Redis: ``respmeter report`` against
    either one explains the whole fleet's traffic, each source and row naming the instance it comes
    from, and /api/usage counts the fleet's commands."""
    import json
    import subprocess
    import sys

    upstream, state = redis_factory(), redis_factory()
    web = proxy_factory(upstream, ["--state-url", state.url, "--instance", "web", "--daily-cap", "100000"])
    worker = proxy_factory(upstream, ["--state-url", state.url, "--instance", "worker", "--daily-cap", "100000"])
    w = worker.client()
    for _ in range(30):
        w.publish("/0.celeryev/worker.heartbeat", "{}")
    for _ in range(2):
        w.brpop(["celery"], timeout=0.1)
    c = web.client()
    for i in range(40):
        c.get(f"session:{i}")
    w.close()
    worker.terminate(timeout=10)  # (a running one pushes every minute; a stopping one at once)

    def report(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "proxy", "report", "--admin", f"127.0.0.1:{web.admin_port}",
                               *args], cwd=support.REPO_ROOT, capture_output=True, text=True, timeout=30)

    r = report("--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["window"]["from"] == "fleet"
    assert set(rep["window"]["instances"]) == {"web", "worker"}
    assert rep["window"]["instances"]["web"]["commands"] >= 40
    heartbeat = next(s for s in rep["sources"] if s["id"] == "celery.heartbeat")
    assert heartbeat["count"] == 30 and heartbeat["instances"] == ["worker"]
    polling = next(s for s in rep["sources"] if s["id"] == "celery.broker_polling")
    assert polling["count"] == 2 and polling["instances"] == ["worker"]
    gets = [row for row in rep["rows"] if row["command"] == "get"]
    assert gets and all(row["instance"] == "web" for row in gets) and sum(row["count"] for row in gets) == 40
    # the fleet's usage by command: the worker's PUBLISHes, read back by web's push
    usage = json.loads(urlopen_json(web, "/api/usage"))
    assert usage["windows"]["daily"]["commands"]["publish"] == 30
    assert usage["windows"]["daily"]["commands"]["get"] == 40
    text = report()
    assert text.returncode == 0, text.stderr
    assert "fleet of 2 instances" in text.stdout and "from worker" in text.stdout, text.stdout
    # this proxy's own live window on demand
    local = json.loads(report("--local", "--json").stdout)
    assert local["window"]["from"] == "live" and all("instance" not in row for row in local["rows"])


def urlopen_json(proxy, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}{path}", timeout=10) as resp:
        return resp.read().decode()


def test_a_state_store_that_hangs_holds_no_client_up(redis_factory, proxy_factory):
    """The state store stops answering (SIGSTOP: the kernel still accepts connections, nothing is
    replied). The proxy finds it down once (that call waits for the 1 s timeout); after that its
    tries to reach it again (every 5 s) run in a thread, so over the next 7 s (a try falls in them)
    a bystander's worst round trip stays far below the timeout. When the store answers again, commands are served
    again."""
    upstream, state, proxies = _fleet(redis_factory, proxy_factory, 1)
    proxy = proxies[0]
    c = proxy.client()
    assert c.incr("x") == 1
    os.kill(state.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        err = None
        while err is None and time.monotonic() < deadline:
            try:
                c.incr("x")
            except Exception as exc:  # noqa: BLE001 - the refusal looked for
                err = str(exc)
        assert err is not None and "usage state unavailable" in err, err
        worst = 0.0
        with support.RespSocket(proxy.host, proxy.port, timeout=10) as s:
            end = time.monotonic() + 7
            while time.monotonic() < end:
                t0 = time.monotonic()
                s.call("PING")  # (PONG, or the refusal: either way the proxy's event loop answered)
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.02)
        assert worst < 0.5, f"a bystander waited {worst:.2f}s"
    finally:
        os.kill(state.pid, signal.SIGCONT)

    def served() -> bool:
        try:
            return c.incr("x") > 1
        except Exception:  # noqa: BLE001 - not yet
            return False

    assert support.eventually(served, timeout=20)
