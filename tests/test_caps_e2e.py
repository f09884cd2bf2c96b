"""Caps and rate limits end to end (caps issue acceptance): real redis-server processes, the proxy as
a real process with a real SQLite state directory, redis-py clients and real Celery workers.

The server's ``INFO commandstats`` (calls + rejected_calls) is the ground truth of what was billed.
redis-py clients are made with ``lib_name=None, lib_version=None, protocol=2`` so that a connection
sends nothing but the test's commands (no HELLO, no CLIENT SETINFO, no CLIENT MAINT_NOTIFICATIONS,
which Redis 7.0 does not even list in commandstats).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import redis

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import RespError, RespSocket, commandstats, commandstats_delta, eventually

PLAIN = dict(lib_name=None, lib_version=None, protocol=2)
CAP_ERROR = re.compile(r"^respmeter: daily cap of (\d+) commands reached, resets at (\S+)$")


def _next_midnight_utc() -> str:
    tomorrow = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
    return dt.datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=dt.timezone.utc).isoformat()


def _usage(proxy) -> dict:
    status, body = proxy.http_get("/api/usage")
    assert status == 200, body
    return json.loads(body)


def _server_total(obs, before) -> int:
    """Commands the server ran since ``before``, but for the observer's own INFO reads."""
    delta = commandstats_delta(before, commandstats(obs))
    delta.pop("info", None)
    return sum(delta.values())


def _quota_used(proxy, window="daily") -> int:
    return int(proxy.metric_sum("respmeter_quota_used", by=(), window=window, client="all").get((), -1))


def _is_cap_error(r, cap: int) -> bool:
    if not isinstance(r, redis.ResponseError):
        return False
    m = CAP_ERROR.match(str(r))
    return bool(m) and int(m.group(1)) == cap and m.group(2) == _next_midnight_utc()


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=support.REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# 1. a daily cap under 20 concurrent pipelining clients
# --------------------------------------------------------------------------------------------------


def test_daily_cap_holds_under_concurrent_pipelines(redis_factory, proxy_factory, tmp_path):
    cap, clients, per_client = 5000, 20, 1000
    server = redis_factory()  # fresh: its commandstats hold only what this test causes
    obs = server.client()
    before = commandstats(obs)
    proxy = proxy_factory(server, ["--daily-cap", str(cap), "--state-dir", str(tmp_path / "state")], log_level="info")
    conns = [proxy.client(socket_timeout=60, **PLAIN) for _ in range(clients)]
    results: list[list | None] = [None] * clients
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        pipe = conns[i].pipeline(transaction=False)
        for _ in range(per_client):
            pipe.incr(f"cap:{i}")
        barrier.wait(timeout=30)
        results[i] = pipe.execute(raise_on_error=False)

    errors = support.in_threads(worker, clients)
    assert not errors, errors
    ok_total = 0
    for i, res in enumerate(results):
        assert res is not None and len(res) == per_client
        n = next((j for j, r in enumerate(res) if not isinstance(r, int)), per_client)
        # in order: real replies first (INCR on the client's own key: 1, 2, 3, ...) ...
        assert res[:n] == list(range(1, n + 1)), f"client {i}: {res[:n][:20]}"
        # ... then only the cap error, with the documented wording
        bad = [r for r in res[n:] if not _is_cap_error(r, cap)]
        assert not bad, f"client {i}: {bad[:3]} (expected 'respmeter: daily cap of {cap} commands reached, resets at {_next_midnight_utc()}')"
        ok_total += n
    # a real server counts what was billed: never more than the cap, the proxy's own commands included
    delta = commandstats_delta(before, commandstats(obs))
    server_total = sum(delta.values())
    print(f"server saw {delta}; {ok_total} INCRs answered")
    assert server_total <= cap, delta
    # and nothing but the clients' own INCRs (and, on the upstream pool, the shared connections'
    # own HELLO, charged to the cap too)
    own = {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total", client="respmeter").items()
           if v and k in delta}
    assert delta == {"incrby": ok_total, **own}, delta
    # the proxy reports the same figure as the server
    assert eventually(lambda: _quota_used(proxy) == server_total, timeout=5), (_quota_used(proxy), server_total)
    usage = _usage(proxy)["windows"]["daily"]
    assert usage["used"] == server_total and usage["cap"] == cap, usage
    assert usage["remaining"] == cap - server_total
    # one proxy process wastes none of the budget it reserved: the whole cap is usable
    assert server_total == cap, f"only {server_total} of the {cap} cap reached the server"


# --------------------------------------------------------------------------------------------------
# 2. kill -9 and restart on the same state directory
# --------------------------------------------------------------------------------------------------


def test_kill_9_and_restart_never_lose_count(redis_factory, proxy_factory, tmp_path):
    cap, batch = 300, 120
    block = max(1, cap // 50)  # the largest block a proxy reserves for this cap (proxy.limits)
    state = tmp_path / "state"
    server = redis_factory()
    obs = server.client()
    before = commandstats(obs)
    crashes = 0
    rounds = []
    capped = False
    for round_no in range(8):
        proxy = proxy_factory(server, ["--daily-cap", str(cap), "--state-dir", str(state)], log_level="info")
        seen = _server_total(obs, before)
        used = _usage(proxy)["windows"]["daily"]["used"]
        # the count continues from at least where it was (never under what the server billed) ...
        assert used >= seen, (round_no, used, seen)
        # ... and a crash over-counts by at most one unspent block
        assert used <= seen + crashes * block, (round_no, used, seen, crashes)
        pipe = proxy.client(**PLAIN).pipeline(transaction=False)
        for _ in range(batch):
            pipe.incr("crash:n")
        res = pipe.execute(raise_on_error=False)
        n = next((j for j, r in enumerate(res) if not isinstance(r, int)), batch)
        assert all(_is_cap_error(r, cap) for r in res[n:]), res[n:][:3]
        rounds.append((used, seen, n))
        proxy.kill()  # SIGKILL: no flush, no release
        crashes += 1
        assert _server_total(obs, before) <= cap
        if n < batch:
            capped = True
            break
    print("rounds (used at start, server total at start, INCRs answered):", rounds)
    assert capped, rounds
    assert len(rounds) >= 3, rounds  # the budget really was spread over several crashes
    seen = _server_total(obs, before)
    assert seen <= cap
    # a final run gets nothing but cap errors and sends nothing upstream
    proxy = proxy_factory(server, ["--daily-cap", str(cap), "--state-dir", str(state)], log_level="info")
    assert _usage(proxy)["windows"]["daily"]["used"] >= seen
    c = proxy.client(**PLAIN)
    for _ in range(5):
        with pytest.raises(redis.ResponseError) as exc:
            c.incr("crash:n")
        assert _is_cap_error(exc.value, cap), exc.value
    assert _server_total(obs, before) == seen
    assert int(obs.get("crash:n")) == seen  # every command the server ran was one of the INCRs


# --------------------------------------------------------------------------------------------------
# 3. MULTI/EXEC at the cap
# --------------------------------------------------------------------------------------------------


def test_transaction_at_the_cap_is_never_half_applied(redis_factory, proxy_factory, tmp_path):
    cap = 8
    server = redis_factory()
    obs = server.client()
    before = commandstats(obs)
    proxy = proxy_factory(server, ["--daily-cap", str(cap), "--state-dir", str(tmp_path / "state")])
    with RespSocket(proxy.host, proxy.port) as s:
        # within budget (MULTI 2 with EXEC's reserved token, SET 1, INCR 1): runs
        assert s.call("MULTI") == b"OK"
        assert s.call("SET", "tx:a", "1") == b"QUEUED"
        assert s.call("INCR", "tx:b") == b"QUEUED"
        assert s.call("EXEC") == [b"OK", 1]
        # crossing the cap: MULTI (6), SET (7), SET (8), SET -> cap; EXEC must not run the first two
        assert s.call("MULTI") == b"OK"
        assert s.call("SET", "tx:x", "1") == b"QUEUED"
        assert s.call("SET", "tx:y", "1") == b"QUEUED"
        r = s.call("SET", "tx:z", "1")
        assert isinstance(r, RespError) and "daily cap of 8 commands reached" in r, r
        r = s.call("SET", "tx:w", "1")
        assert isinstance(r, RespError), r
        r = s.call("EXEC")
        assert isinstance(r, RespError) and r.startswith("EXECABORT"), r
        # the connection is out of the transaction, still capped
        r = s.call("GET", "tx:a")
        assert isinstance(r, RespError) and "daily cap of 8" in r, r
    # the server: first transaction applied, second one not at all
    assert obs.get("tx:a") == b"1" and obs.get("tx:b") == b"1"
    assert obs.exists("tx:x", "tx:y", "tx:z", "tx:w") == 0
    delta = commandstats_delta(before, commandstats(obs))
    delta.pop("get", None), delta.pop("exists", None)  # the checks just above
    # (Redis counts a queued command only when EXEC runs it: the two SETs queued in the discarded
    # transaction reached the server, and are billed by Upstash, but are not in its commandstats.)
    assert delta == {"multi": 2, "set": 1, "incr": 1, "exec": 1, "discard": 1}, delta
    # the proxy counted everything it sent: 4 + MULTI, SET, SET, DISCARD = exactly the cap
    assert _usage(proxy)["windows"]["daily"]["used"] == cap


# --------------------------------------------------------------------------------------------------
# 4. a real Celery worker behind an exhausted cap, on_cap = idle
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_celery_worker_idles_behind_an_exhausted_cap(redis_factory, proxy_factory, tmp_path):
    """A default worker (the acceptance case) and, on its own listener so its commands are told
    apart, a worker with --without-heartbeat: with nothing but blocking pops to send, it shows that
    its BRPOPs are held for their timeout and answered empty (with --on-cap error such a worker dies)."""
    cap = 800
    server = redis_factory()
    obs = server.client()
    ports = {"dflt": support.free_port(), "nohb": support.free_port()}
    proxy = proxy_factory(server, [
        "--daily-cap", str(cap), "--on-cap", "idle", "--state-dir", str(tmp_path / "state"),
        *[a for name, port in ports.items() for a in ("--listen", f"{name}=127.0.0.1:{port}")],
    ], log_level="info")
    workers = {
        "dflt": support.CeleryWorker(f"redis://127.0.0.1:{ports['dflt']}/0", tmp_path / "dflt", stop_timeout=3),
        "nohb": support.CeleryWorker(f"redis://127.0.0.1:{ports['nohb']}/0", tmp_path / "nohb", stop_timeout=3,
                                     worker_args=["--without-heartbeat"]),
    }
    try:
        for w in workers.values():
            w.start()
        for w in workers.values():
            w.wait_ready()
        time.sleep(1.0)  # their steady polling loops are running
        # the rest of the budget goes to another client: the cap is hit while the workers poll
        c = proxy.client(**PLAIN)
        filled = 0
        while True:
            try:
                c.incr("fill")
                filled += 1
            except redis.ResponseError as exc:
                assert _is_cap_error(exc, cap), exc
                break
            assert filled < cap
        time.sleep(2.0)  # a BRPOP forwarded before the cap completes upstream within its 1 s timeout
        before = commandstats(obs)
        cpu0, t0 = {k: w.cpu_seconds() for k, w in workers.items()}, time.monotonic()
        rej0 = proxy.metric_sum("respmeter_commands_total", by=("client", "command"), outcome="rejected")
        time.sleep(10)
        cpu1, t1 = {k: w.cpu_seconds() for k, w in workers.items()}, time.monotonic()
        delta = commandstats_delta(before, commandstats(obs))
        rej1 = proxy.metric_sum("respmeter_commands_total", by=("client", "command"), outcome="rejected")
        alive = {k: w.is_running() for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()
    grown = {k: int(v - rej0.get(k, 0)) for k, v in rej1.items() if v > rej0.get(k, 0)}
    cpu = {k: (cpu1[k] - cpu0[k]) / (t1 - t0) for k in workers}
    print(f"filled {filled}; worker cpu share {cpu} over {t1 - t0:.1f}s; rejected in that time {grown}")
    for k, w in workers.items():
        assert alive[k], f"{k} worker died:\n" + w.log_text()[-3000:]
        assert cpu[k] < 0.30, cpu
    assert delta == {}, f"the server billed {delta} behind an exhausted cap"
    assert sum(n for (client, _), n in grown.items() if client == "dflt") > 0, grown
    # idle: the heartbeat-less worker keeps polling, each BRPOP held ~1 s and answered empty
    assert grown.get(("nohb", "brpop"), 0) >= 5, grown
    assert "Traceback" not in proxy.log_text()


# --------------------------------------------------------------------------------------------------
# 5. a rate limit on the Celery listener's BRPOP
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rate_limited_celery_polling_still_works_and_spares_other_clients(redis_factory, proxy_factory, tmp_path):
    server = redis_factory()
    obs = server.client()
    celery_port = support.free_port()
    proxy = proxy_factory(server, [
        "--listen", f"celery=127.0.0.1:{celery_port}",
        "--rate-limit", "name=polling,client=celery,command=brpop,rate=6/min,burst=1,action=delay",
        "--state-dir", str(tmp_path / "state"),
    ], log_level="info")
    worker = support.CeleryWorker(f"redis://127.0.0.1:{celery_port}/0", tmp_path / "w", stop_timeout=3)
    with worker:
        worker.wait_ready()
        before = commandstats(obs)
        t0 = time.monotonic()
        # a task submitted through the other listener is still picked up and answered
        result = support.celery_call(proxy.url + "/0", args=(2, 40), timeout=15)
        picked_up = time.monotonic() - t0
        assert result["sum"] == 42 and result["pid"] == worker.pid
        # a client of the other listener is not slowed down, BRPOP included
        c = proxy.client(**PLAIN)
        start = time.monotonic()
        for i in range(25):
            c.set(f"other:{i}", i)
            assert c.get(f"other:{i}") == str(i).encode()
        round_trips = time.monotonic() - start
        start = time.monotonic()
        assert c.brpop(["other:empty"], timeout=0.1) is None
        assert c.brpop(["other:empty"], timeout=0.1) is None
        own_brpops = time.monotonic() - start
        time.sleep(max(0.0, 20 - (time.monotonic() - t0)))
        delta = commandstats_delta(before, commandstats(obs))
        alive = worker.is_running()
    throttled = proxy.metric_sum("respmeter_throttled_total", by=("rule", "action"))
    worker_brpops = delta.get("brpop", 0) - 2
    print(f"task picked up and answered in {picked_up:.1f}s; worker BRPOPs upstream in 20 s: {worker_brpops}; "
          f"50 round trips {round_trips:.2f}s; 2 BRPOPs {own_brpops:.2f}s; throttled {throttled}")
    assert alive
    assert worker_brpops <= 3 + 1, delta  # about one per 10 s, plus the one that took the task
    assert worker_brpops >= 1, delta
    assert throttled.get(("polling", "delay"), 0) > 0, throttled
    assert round_trips < 2.0, round_trips
    assert own_brpops < 1.5, own_brpops


# --------------------------------------------------------------------------------------------------
# 6. a full config file: check-config, run --config with a flag overriding it, usage
# --------------------------------------------------------------------------------------------------


def test_config_file_check_run_and_usage(redis_factory, proxy_factory, tmp_path):
    server = redis_factory()
    state = tmp_path / "state-from-file"
    config = tmp_path / "respmeter.toml"
    config.write_text(textwrap.dedent(f"""\
        [proxy]
        listen = ["127.0.0.1:{support.free_port()}"]
        upstream = "{server.url}"
        state_dir = "{state}"
        log_level = "info"
        connect_timeout = 3

        [caps]
        daily = 1000
        monthly = 20000
        timezone = "Etc/UTC"
        on_cap = "idle"

        [caps.clients.celery]
        daily = 500

        [[rate_limit]]
        name = "echoes"
        client = "*"
        command = "echo"
        rate = "1/min"
        burst = 1
        action = "reject"

        [[rate_limit]]
        name = "celery-polling"
        client = "celery"
        command = "brpop"
        rate = "6/min"
        burst = 1
        action = "delay"
        max_queue = 100
        """))
    check = _run("check-config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout and "2 rate limit(s)" in check.stdout, check.stdout

    # the file is used; --daily-cap on the command line overrides its [caps] daily
    proxy = proxy_factory(server, ["--config", str(config), "--daily-cap", "777"], log_level=None)
    usage = _usage(proxy)
    assert usage["windows"]["daily"]["cap"] == 777  # the flag
    assert usage["windows"]["monthly"]["cap"] == 20000  # the file
    assert usage["timezone"] == "Etc/UTC" and usage["on_cap"] == "idle"
    assert usage["windows"]["daily"]["clients"]["celery"]["cap"] == 500
    c = proxy.client(**PLAIN)
    for i in range(5):
        c.set(f"cfg:{i}", i)
    assert c.echo("a") == b"a"
    with pytest.raises(redis.ResponseError, match="rate limit echoes exceeded"):
        c.echo("b")  # the file's rate limit applies
    assert (state / "usage.sqlite3").exists()  # the file's state_dir

    # `usage --admin` on the running proxy: today's usage against the flag's cap
    assert eventually(lambda: _usage(proxy)["windows"]["daily"]["used"] == 6, timeout=5)
    out = _run("usage", "--admin", f"127.0.0.1:{proxy.admin_port}")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert "Today (" in out.stdout and "used 6 of 777 cap, 771 left" in out.stdout, out.stdout
    assert re.search(r"set\s+5\b", out.stdout) and re.search(r"echo\s+1\b", out.stdout), out.stdout
    js = json.loads(_run("usage", "--admin", f"127.0.0.1:{proxy.admin_port}", "--json").stdout)
    assert js["windows"]["daily"]["used"] == 6

    # `usage --state-dir` on the stopped proxy's state
    assert proxy.terminate() == 0
    out = _run("usage", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert "used 6 (no cap)" in out.stdout, out.stdout
    out = _run("usage", "--state-dir", str(state), "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["windows"]["daily"]["used"] == 6 and snap["windows"]["daily"]["cap"] == 1000, snap["windows"]["daily"]
    assert snap["windows"]["daily"]["commands"] == {"set": 5, "echo": 1}
    missing = _run("usage", "--state-dir", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and "no usage state" in missing.stderr
