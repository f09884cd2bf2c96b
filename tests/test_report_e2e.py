"""``respmeter report`` and ``respmeter top`` end to end (report issue acceptance): real Celery workers
and redis-py clients through the proxy as a real process, the report read back with the real CLI.

Two idle Celery workers run IN PARALLEL, each through its own fresh proxy (own state directory) in
front of its own redis-server, for about a minute (module fixture ``idle``):

* ``default``: default settings;
* ``tuned``: ``broker_transport_options={'polling_interval': 5}`` and ``--without-heartbeat``.

Each proxy is started just before its worker: the live report's span is measured from the proxy's
start, so the worker's own start-up (~2 s before its first BRPOP) is inside the measured span.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

RUN_SECONDS = 60.0
PLAIN = dict(lib_name=None, lib_version=None, protocol=2)
TOP_KEYS = {"version", "generated_at", "window", "totals", "sources", "unrecognised", "rows", "ineffective_settings"}
NAMED_SOFTWARE = ("celery", "kombu", "redis-py")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=support.REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def report_json(*args: str) -> dict:
    r = cli("report", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def admin(proxy) -> str:
    return f"127.0.0.1:{proxy.admin_port}"


def source(rep: dict, sid: str) -> dict | None:
    return next((s for s in rep["sources"] if s["id"] == sid), None)


def cut_section(cuts: str, name: str, per_day: int) -> str:
    """The lines of one source under "What cuts it:" in the human report."""
    head = f"  {name} ({per_day:,}/day):\n"
    assert head in cuts, (head, cuts)
    return re.split(r"\n(?=  \S)", cuts.split(head, 1)[1], maxsplit=1)[0]


def within(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance * expected


# --------------------------------------------------------------------------------------------------
# two idle workers, in parallel, about a minute
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    setups = {
        "default": dict(transport_options={}, worker_args=[]),
        "tuned": dict(transport_options={"polling_interval": 5}, worker_args=["--without-heartbeat"]),
    }
    servers, proxies, workers, started = {}, {}, {}, {}
    out: dict = {"live": {}, "human": {}, "state": {}, "state_human": {}, "state_dir": {}}
    try:
        for name in setups:
            servers[name] = support.RedisServer(workdir=tmp_path_factory.mktemp(f"redis-{name}")).start()
        for name, setup in setups.items():
            state = tmp_path_factory.mktemp(f"state-{name}")
            out["state_dir"][name] = state
            # fresh proxy, then its worker right away: the measured span starts at the proxy's start
            proxies[name] = support.ProxyProcess(servers[name], ["--state-dir", str(state)], log_level="info",
                                                 workdir=tmp_path_factory.mktemp(f"proxy-{name}")).start()
            started[name] = time.monotonic()
            workers[name] = support.CeleryWorker(proxies[name].url + "/0", tmp_path_factory.mktemp(f"worker-{name}"),
                                                 stop_timeout=5, **setup).start()
        for w in workers.values():
            w.wait_ready()
        time.sleep(max(0.0, started["default"] + RUN_SECONDS - time.monotonic()))
        for name, w in workers.items():
            assert w.is_running(), w.log_text()[-3000:]
        # the reports, while the workers still run
        for name, p in proxies.items():
            out["live"][name] = report_json("--admin", admin(p), "--window", "10m")
            r = cli("report", "--admin", admin(p), "--window", "10m")
            assert r.returncode == 0, r.stderr
            out["human"][name] = r.stdout
        out["elapsed"] = {name: time.monotonic() - t for name, t in started.items()}
        print("\n===== respmeter report --window 10m: default Celery worker, idle, "
              f"{out['elapsed']['default']:.0f} s =====\n{out['human']['default']}")
        print("===== respmeter report --window 10m --json: default Celery worker, idle =====\n"
              + json.dumps(out["live"]["default"], indent=1, sort_keys=True))
        print(f"===== respmeter report --window 10m: tuned worker =====\n{out['human']['tuned']}")
        # then stop the workers and the proxies (SIGTERM: the proxy flushes its state) and read the state
        for w in workers.values():
            w.stop()
        for name, p in proxies.items():
            assert p.terminate() == 0
            out["state"][name] = report_json("--state-dir", str(out["state_dir"][name]))
            r = cli("report", "--state-dir", str(out["state_dir"][name]))
            assert r.returncode == 0, r.stderr
            out["state_human"][name] = r.stdout
        yield out
    finally:
        for w in workers.values():
            w.stop(timeout=2)
        for p in proxies.values():
            if p.is_running():
                try:
                    p.terminate()
                except TimeoutError:
                    pass
        for s in servers.values():
            s.stop()


@pytest.mark.slow
def test_default_worker_sources_projections_and_knobs(idle):
    rep = idle["live"]["default"]
    # (nearly) everything is attributed to named Celery / kombu / redis-py sources
    assert rep["unrecognised"]["share"] <= 0.05, rep["unrecognised"]
    named = sum(s["count"] for s in rep["sources"] if s["software"].startswith(NAMED_SOFTWARE))
    assert named >= 0.95 * rep["totals"]["commands"], (named, rep["totals"]["commands"])
    # BRPOP polling: one per second -> 86,400/day; heartbeat PUBLISH: one per 2 s -> 43,200/day
    polling = source(rep, "celery.broker_polling")
    heartbeat = source(rep, "celery.heartbeat")
    assert polling and heartbeat, [s["id"] for s in rep["sources"]]
    print(f"measured over {rep['window']['measured_seconds']} s: BRPOP {polling['count']} -> {polling['per_day']}/day, "
          f"heartbeat {heartbeat['count']} -> {heartbeat['per_day']}/day")
    assert within(polling["per_day"], 86_400, 0.10), polling
    assert within(heartbeat["per_day"], 43_200, 0.10), heartbeat
    assert polling["commands"] == ["brpop"] and heartbeat["commands"] == ["publish"]
    assert any(r["pattern"].endswith(" timeout=1") for r in rep["rows"] if r["source"] == "celery.broker_polling")
    assert within(polling["instances_estimate"], 1.0, 0.10) and within(heartbeat["instances_estimate"], 1.0, 0.10)
    # the knobs that cut them are named, with what they save
    assert any("polling_interval" in k["setting"] for k in polling["knobs"]), polling["knobs"]
    assert any("--without-heartbeat" in k["setting"] for k in heartbeat["knobs"]), heartbeat["knobs"]
    off = next(k for k in heartbeat["knobs"] if "--without-heartbeat" in k["setting"])
    assert abs(off["saving_per_day"] - heartbeat["per_day"]) <= 1  # keep = 0: all of it
    p30 = next(k for k in polling["knobs"] if "'polling_interval': 30" in k["setting"])
    assert abs(p30["saving_per_day"] - polling["per_day"] * (1 - 1 / 30)) <= 1  # from the current 1 s


@pytest.mark.slow
def test_tuned_worker_report_reflects_its_settings(idle):
    rep = idle["live"]["tuned"]
    polling = source(rep, "celery.broker_polling")
    assert polling, [s["id"] for s in rep["sources"]]
    print(f"tuned: measured over {rep['window']['measured_seconds']} s: BRPOP {polling['count']} -> "
          f"{polling['per_day']}/day")
    assert within(polling["per_day"], 86_400 / 5, 0.20), polling
    rows = [r for r in rep["rows"] if r["source"] == "celery.broker_polling"]
    assert rows and all(r["pattern"].endswith(" timeout=5") for r in rows), rows
    hb = source(rep, "celery.heartbeat")
    assert hb is None or hb["per_day"] < 1000, hb
    # the polling knobs' savings start from the current interval, 5 s (not the 1 s default)
    for k in polling["knobs"]:
        m = re.search(r"'polling_interval': (\d+)", k["setting"])
        assert m, k
        keep = min(1.0, 5 / int(m.group(1)))
        assert abs(k["saving_per_day"] - polling["per_day"] * (1 - keep)) <= 1, (k, polling["per_day"])
    assert rep["totals"]["per_day"] < idle["live"]["default"]["totals"]["per_day"]


@pytest.mark.slow
def test_human_report_shows_totals_dominant_sources_and_their_settings(idle):
    """The human report is its own run of the CLI (moments after the --json one), so figures are
    compared with the JSON's within a few percent, and exactly with each other within the text."""
    text = idle["human"]["default"]
    rep = idle["live"]["default"]
    assert text.startswith("respmeter report (live, last 10.0m; measured over ")
    # the projected daily total and the monthly projection against Upstash's free 500K
    m = re.search(r"^Total: [\d.,]+/min, [\d.,]+/hour, ([\d,]+)/day projected, ~([\d,]+)/month$", text, re.M)
    assert m, text
    per_day, per_month = (int(g.replace(",", "")) for g in m.groups())
    assert within(per_day, rep["totals"]["per_day"], 0.05) and abs(per_month - 30 * per_day) <= 30, m.group(0)
    m = re.search(r"^Upstash free tier \(500,000/month\): this rate uses (\d+)% of it", text, re.M)
    assert m and abs(int(m.group(1)) - round(100 * per_month / 500_000)) <= 1, text
    # the sources, largest first, each with its share and daily projection
    where = text.split("Where it comes from:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    shown = []
    for line in where:
        m = re.match(r"^ +([\d.]+)%  +([\d,]+)/day  (.+?)(  \(~[\d.]+ instance\(s\)\))?$", line)
        if m:
            shown.append((m.group(3), float(m.group(1)), int(m.group(2).replace(",", ""))))
    assert len(shown) == len(rep["sources"]) >= 2, where
    assert [x[1] for x in shown] == sorted((x[1] for x in shown), reverse=True)
    cuts = text.split("What cuts it:\n", 1)[1].split("\n\n", 1)[0]
    by_name = {s["name"]: s for s in rep["sources"]}
    print("two dominant sources:", shown[:2])
    for name, share, day in shown[:2]:
        s = by_name[name]
        assert abs(share - 100 * s["share"]) <= 1.0, (name, share, s["share"])
        section = cut_section(cuts, name, day)
        for k in s["knobs"]:  # the exact settings that cut it, each with its saving
            assert re.search(re.escape(f"    - {k['setting']}\n") + r" +.*; saves ~[\d,]+/day \(~[\d,]+/month\)",
                             section), (name, k["setting"], section)
    # BRPOP polling and the heartbeat, the steady-state pair, with their shares and the settings
    for sid, setting in (("celery.broker_polling", "broker_transport_options = {'polling_interval': 30}"),
                         ("celery.heartbeat", "celery worker --without-heartbeat")):
        s = source(rep, sid)
        row = next((x for x in shown if x[0] == s["name"]), None)
        assert row and abs(row[1] - 100 * s["share"]) <= 1.0, (row, s)
        section = cut_section(cuts, s["name"], row[2])
        assert re.search(re.escape(f"    - {setting}\n") + r" +.*; saves ~[\d,]+/day", section), section
    assert [x[0] for x in shown[:1]] == [source(rep, "celery.broker_polling")["name"]]
    assert "broker_heartbeat: AMQP only" in text  # the setting people try first, and that does nothing
    assert re.search(r"brpop +celery celery\\x06\\x16\* timeout=1 +anonymous +celery\.broker_polling", text), text


@pytest.mark.slow
def test_report_json_is_stable(idle):
    for name in ("default", "tuned"):
        rep = idle["live"][name]
        assert rep["version"] == 1
        assert set(rep) == TOP_KEYS, set(rep) ^ TOP_KEYS
        assert rep["window"]["from"] == "live" and rep["window"]["requested_seconds"] == 600
        assert 0 < rep["window"]["measured_seconds"] <= idle["elapsed"][name] + 1
        assert {"commands", "per_minute", "per_hour", "per_day", "per_month", "upstash_free_monthly",
                "upstash_free_share", "used_today", "projected_today", "used_month", "projected_month"} <= set(rep["totals"])
        assert rep["totals"]["upstash_free_monthly"] == 500_000
        assert rep["totals"]["commands"] == sum(r["count"] for r in rep["rows"])
        for r in rep["rows"]:
            assert set(r) == {"client", "command", "pattern", "count", "per_minute", "per_hour", "per_day", "share", "source"}
        for s in rep["sources"]:
            assert {"id", "name", "software", "description", "count", "share", "per_day", "commands", "knobs", "notes"} <= set(s)
            for k in s["knobs"]:
                assert set(k) == {"setting", "effect", "saving_per_day", "saving_per_month"}
        assert [x["setting"] for x in rep["ineffective_settings"]][0] == "broker_heartbeat"


@pytest.mark.slow
def test_report_from_a_stopped_proxys_state(idle):
    for name in ("default", "tuned"):
        rep = idle["state"][name]
        live = idle["live"][name]
        assert rep["window"]["from"] == "state" and rep["rows"], rep["window"]
        brpop = [r for r in rep["rows"] if r["command"] == "brpop" and r["source"] == "celery.broker_polling"]
        assert brpop, rep["rows"]
        # everything the live report saw was flushed (and a little more, until the worker stopped)
        state_counts = {(r["client"], r["command"], r["pattern"]): r["count"] for r in rep["rows"]}
        short = {k: (n, state_counts.get(k, 0)) for r in live["rows"]
                 for k, n in [((r["client"], r["command"], r["pattern"]), r["count"])] if state_counts.get(k, 0) < n}
        assert not short, short
        assert rep["totals"]["used_today"] >= live["totals"]["commands"]
    assert "respmeter report (state directory, today; measured over" in idle["state_human"]["default"]
    assert "Celery worker polling its queues (BRPOP)" in idle["state_human"]["default"]


# --------------------------------------------------------------------------------------------------
# unrecognised traffic, the sliding-window rate limiter, and `top`
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def app_proxy(redis_factory, proxy_factory, tmp_path):
    server = redis_factory()
    return proxy_factory(server, ["--daily-cap", "100000", "--state-dir", str(tmp_path / "state")], log_level="info")


def test_unrecognised_traffic_and_the_sliding_window_limiter(app_proxy):
    c = app_proxy.client(**PLAIN)
    now = time.time()
    for user in ("user123", "user456", "user789"):
        key = f"ratelimit:spotify:{user}"
        for i in range(3):  # the classic sliding-window check: four commands per request
            c.zremrangebyscore(key, 0, now - 60)
            c.zcard(key)
            c.zadd(key, {f"{now}-{i}": now})
            c.expire(key, 60)
    for uid in (123, 456):
        c.hset(f"myapp:user:{uid}", mapping={"name": "x", "plan": "free"})
        c.hgetall(f"myapp:user:{uid}")
    c.zadd("leaderboard:2026", {"a": 1})  # one sorted-set write on its own is no rate limiter
    c.expire("session:abc", 30)
    rep = report_json("--admin", admin(app_proxy), "--window", "10m")
    rows = {(r["command"], r["pattern"]): r for r in rep["rows"]}
    print(json.dumps(rep["rows"], indent=1))
    for cmd in ("zremrangebyscore", "zcard", "zadd", "expire"):
        r = rows[(cmd, "ratelimit:spotify:user*")]
        assert r["source"] == "ratelimiter.sliding_window" and r["count"] == 9, r
    limiter = source(rep, "ratelimiter.sliding_window")
    assert limiter["count"] == 36 and limiter["software"] == "application"
    assert any("EVALSHA" in k["setting"] for k in limiter["knobs"])
    for key in (("hset", "myapp:user:*"), ("hgetall", "myapp:user:*"), ("zadd", "leaderboard:*"), ("expire", "session:abc")):
        assert rows[key]["source"] is None, rows[key]
    unrec = sum(r["count"] for r in rep["rows"] if r["source"] is None)
    assert unrec == 6 and rep["unrecognised"]["count"] == unrec
    assert rep["unrecognised"]["share"] == round(unrec / rep["totals"]["commands"], 4)
    text = cli("report", "--admin", admin(app_proxy), "--window", "10m").stdout
    assert re.search(r"hset +myapp:user:\* +anonymous +UNRECOGNISED", text), text
    assert re.search(r"zadd +ratelimit:spotify:user\* +anonymous +ratelimiter\.sliding_window", text), text
    assert "unrecognised (see the table)" in text
    assert "Sliding-window rate limiter" in text


def test_top_once_and_interactive(app_proxy):
    c = app_proxy.client(**PLAIN)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            c.get("top:key")
            time.sleep(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.3)
        r = cli("top", "--admin", admin(app_proxy), "--once", "--interval", "1")
    finally:
        stop.set()
        t.join(5)
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("respmeter top   upstream up"), lines[0]
    assert re.match(r"^ +today: +[\d,]+ used  \[#*\.*\] +[\d.]+%  cap 100,000$", lines[1]), lines[1]
    head = lines.index(next(ln for ln in lines if ln.startswith("COMMAND")))
    row = lines[head + 1].split()
    assert row[0] == "get" and float(row[1].replace(",", "")) > 10, lines[head + 1]  # ~100/s of GETs
    assert any(ln.startswith("CLIENT") for ln in lines)

    # interactive, under a pseudo-terminal: draws frames, quits on 'q'
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 110, 0, 0))
    env = dict(os.environ, TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "top", "--admin", admin(app_proxy), "--interval", "0.5"],
                            cwd=support.REPO_ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    support._register(proc)
    screen = b""
    try:
        deadline = time.monotonic() + 10
        while b"COMMAND" not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        assert b"respmeter top" in screen and b"COMMAND" in screen, screen[-2000:]
        os.write(master, b"q")
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 3:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    os.read(master, 65536)
                except OSError:
                    pass
        quit_after = time.monotonic() - t0
        assert proc.poll() == 0, f"top still running {quit_after:.1f}s after 'q' (rc {proc.poll()})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        support._unregister(proc)
        os.close(master)
