"""What the savers saved, where users see it: the metric ``respmeter_saved_commands_total``, the saved
section of ``respmeter report`` (live, through /api/traffic, and from a stopped proxy's state), and
the dashboard's saved panels. Unit level, on hand-fed ``Stats``; the Prometheus stack of
tests/test_observability.py evaluates the panels' queries against a real proxy with ``--savers ping``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.explain import build_report, live_traffic, stored_traffic
from proxy.limits import CapConfig, Limits
from proxy.metrics import Stats, StatsCollector
from proxy.patterns import PatternTracker
from proxy.report import format_report
from proxy.savedcounts import saved_window
from proxy.store import Store

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_JSON = ROOT / "grafana" / "dashboards" / "respmeter.json"
METRIC = "respmeter_saved_commands_total"
START = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def exposition(stats: Stats) -> str:
    reg = CollectorRegistry()
    reg.register(StatsCollector(stats))
    return generate_latest(reg).decode()


# -------------------------------------------------------------------------------------------------
# the metric
# -------------------------------------------------------------------------------------------------


def test_saved_commands_are_exported_by_client_command_and_saver() -> None:
    s = Stats()
    s.count_saved("worker", "brpop", "poll", 86)
    s.count_saved("worker", "publish", "events", 43)
    s.count_saved("worker", "client|setinfo", "handshake", 2)
    s.count_saved("web", "ping", "ping")
    text = exposition(s)
    assert f"# TYPE {METRIC} counter" in text
    assert f'{METRIC}{{client="worker",command="brpop",saver="poll"}} 86.0' in text
    assert f'{METRIC}{{client="worker",command="client|setinfo",saver="handshake"}} 2.0' in text

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    fam = fams["respmeter_saved_commands"]
    assert fam.type == "counter"
    got = {}
    for sample in fam.samples:
        assert sample.name == METRIC
        assert set(sample.labels) == {"client", "command", "saver"}  # exactly these labels
        got[(sample.labels["client"], sample.labels["command"], sample.labels["saver"])] = sample.value
    assert got == {("worker", "brpop", "poll"): 86, ("worker", "publish", "events"): 43,
                   ("worker", "client|setinfo", "handshake"): 2, ("web", "ping", "ping"): 1}
    # a saved command is also a command the client sent, answered locally; never an upstream one
    local = {(x.labels["client"], x.labels["command"]): x.value for x in fams["respmeter_commands"].samples
             if x.labels["outcome"] == "local"}
    assert local == {(c, cmd): n for (c, cmd, _), n in got.items()}
    assert not fams["respmeter_upstream_commands"].samples


def test_nothing_saved_exports_the_family_without_samples() -> None:
    text = exposition(Stats())
    assert f"# TYPE {METRIC} counter" in text  # documented, discoverable
    assert not re.search(rf"^{METRIC}\{{", text, re.M)


# -------------------------------------------------------------------------------------------------
# the live report: /api/traffic (explain.live_traffic)
# -------------------------------------------------------------------------------------------------


def tracked_stats(clock: Clock) -> Stats:
    s = Stats()
    s.patterns = PatternTracker(clock=clock)
    return s


def test_live_traffic_windows_the_saved_counts_like_the_upstream_rows() -> None:
    clock = Clock()
    s = tracked_stats(clock)
    # an hour ago: 100 polls saved, and 10 BRPOPs went upstream
    clock.t += 1
    s.count_saved("worker", "brpop", "poll", 100)
    s.patterns.add("worker", "brpop", "celery timeout=1", 10)
    for _ in range(3600):  # the proxy flushes every second (Limits.flush takes the deltas)
        clock.t += 1
        saved_window(s).take_deltas()
        s.patterns.take_deltas()
    # the last minute: 60 polls and 30 heartbeats saved, 6 BRPOPs upstream
    for i in range(60):
        clock.t += 1
        s.count_saved("worker", "brpop", "poll")
        if i % 2:
            s.count_saved("worker", "publish", "events")
        if i % 10 == 0:
            s.patterns.add("worker", "brpop", "celery timeout=1")
        saved_window(s).take_deltas()
        s.patterns.take_deltas()

    t = live_traffic(s, None, 60, savers={"poll", "events"})
    assert t["saved"] == [{"client": "worker", "command": "brpop", "saver": "poll", "count": 60},
                          {"client": "worker", "command": "publish", "saver": "events", "count": 30}]
    assert t["saved_measured_seconds"] == t["measured_seconds"] == 60
    assert t["rows"] == [{"client": "worker", "command": "brpop", "pattern": "celery timeout=1", "count": 6}]
    assert t["savers"] == ["events", "poll"]
    json.dumps(t)  # what /api/traffic sends

    day = live_traffic(s, None, 86400)
    assert {(r["command"], r["count"]) for r in day["saved"]} == {("brpop", 160), ("publish", 30)}
    assert day["savers"] is None  # not known unless the caller says


def test_live_traffic_without_anything_saved() -> None:
    t = live_traffic(tracked_stats(Clock()), None, 600, savers=())
    assert t["saved"] == [] and t["savers"] == []
    # a proxy without key-pattern tracking still windows what it saved
    s = Stats()
    s.count_saved("app", "ping", "ping", 5)
    t = live_traffic(s, None, 600)
    assert t["saved"] == [{"client": "app", "command": "ping", "saver": "ping", "count": 5}]


# -------------------------------------------------------------------------------------------------
# the report's saved section
# -------------------------------------------------------------------------------------------------

CELERY_ROWS = [
    {"client": "worker", "command": "brpop", "pattern": "celery celery\\x06\\x16* timeout=1", "count": 600},
    {"client": "worker", "command": "publish", "pattern": "/*.celeryev/worker.heartbeat", "count": 300},
]


def traffic(rows: list[dict], saved: list[tuple[str, str, str, int]], savers=None, seconds: float = 600) -> dict:  # noqa: ANN001
    return {"window_seconds": seconds, "measured_seconds": seconds, "from": "live", "rows": rows,
            "saved": [{"client": c, "command": cmd, "saver": sv, "count": n} for c, cmd, sv, n in saved],
            "saved_measured_seconds": seconds, "savers": savers}


def test_saved_section_per_saver_and_command_as_commands_a_day() -> None:
    t = traffic(CELERY_ROWS[:1], [("worker", "brpop", "poll", 540), ("worker", "publish", "events", 300),
                                  ("worker", "client|setinfo", "handshake", 4),
                                  ("worker", "client|maint_notifications", "handshake", 2)],
                savers=["events", "handshake", "poll"])
    rep = build_report(t, None)
    sv = rep["saved"]
    assert sv["count"] == 846 and sv["per_day"] == 846 * 144 and sv["per_month"] == 846 * 144 * 30
    assert sv["share"] == round(846 / (846 + 600), 4)  # of what would have gone upstream
    assert [(b["saver"], b["count"], b["per_day"], b["commands"]) for b in sv["by_saver"]] == [
        ("poll", 540, 77_760, ["brpop"]), ("events", 300, 43_200, ["publish"]),
        ("handshake", 6, 864, ["client|maint_notifications", "client|setinfo"])]
    assert [(r["saver"], r["command"], r["per_day"]) for r in sv["rows"]] == [
        ("poll", "brpop", 77_760), ("events", "publish", 43_200), ("handshake", "client|setinfo", 576),
        ("handshake", "client|maint_notifications", 288)]
    assert sv["hint"] is None
    # what is left: the upstream totals are unchanged by the saved counts
    assert rep["totals"]["commands"] == 600 and rep["totals"]["per_day"] == 86_400

    text = format_report(rep)
    print(text)
    section = text.split("\n\n")[2]
    lines = section.splitlines()
    assert lines[0] == ("Saved by the proxy (savers on: events, handshake, poll): answered locally, never "
                        "sent upstream")
    assert lines[1] == ("  846 commands over 10.0m: at this rate 121,824/day, ~3,654,720/month; 59% of what "
                        "would have gone upstream")
    assert re.fullmatch(r" +/day +count +saver +command", lines[2]), lines[2]  # one client: no client column
    assert re.fullmatch(r" +77,760 +540  poll +brpop", lines[3]), lines[3]
    assert re.fullmatch(r" +288 +2  handshake +client\|maint_notifications", lines[6]), lines[6]
    assert lines[7] == "  by saver: poll 77,760/day, events 43,200/day, handshake 864/day"
    assert lines[8].startswith("The totals above and everything below are what is left")
    assert text.index("Saved by the proxy") < text.index("Where it comes from:")
    assert "Hint:" not in text


def test_saved_section_names_clients_when_there_are_several() -> None:
    rep = build_report(traffic([], [("worker", "brpop", "poll", 60), ("beat", "ping", "ping", 6),
                                    ("worker", "ping", "ping", 3)], seconds=60), None)
    assert [(r["saver"], r["client"], r["count"]) for r in rep["saved"]["rows"]] == [
        ("poll", "worker", 60), ("ping", "beat", 6), ("ping", "worker", 3)]
    assert rep["saved"]["share"] == 1.0  # nothing went upstream
    text = format_report(rep)
    assert re.search(r"^ +/day +count +saver +command +client$", text, re.M), text
    assert re.search(r"^ +8,640 +6  ping +ping +beat$", text, re.M), text
    assert "Saved by the proxy: answered locally" in text  # savers on: not known here


def test_rows_option_bounds_the_saved_rows() -> None:
    saved = [(f"c{i}", "ping", "ping", 100 - i) for i in range(30)]
    text = format_report(build_report(traffic([], saved), None), limit=5)
    assert "  ... 25 more rows (--rows N, or --json)" in text


def test_no_savers_no_saved_section_and_no_hint_without_celery() -> None:
    rows = [{"client": "app", "command": "get", "pattern": "k:*", "count": 100}]
    for t in (traffic(rows, []), traffic(rows, [], savers=[]),
              {"window_seconds": 600, "measured_seconds": 600, "from": "live", "rows": rows}):  # an older proxy
        rep = build_report(t, None)
        assert rep["saved"]["count"] == 0 and rep["saved"]["rows"] == [] and rep["saved"]["hint"] is None
        text = format_report(rep)
        assert "Saved" not in text and "saver" not in text.lower() and "Hint" not in text, text


def test_celery_polling_without_savers_gets_a_one_line_hint() -> None:
    for savers in (None, []):
        rep = build_report(traffic(CELERY_ROWS, [], savers=savers), None)
        hint = rep["saved"]["hint"]
        assert hint == ("respmeter run --savers celery lets the proxy answer part of Celery's queue polling and "
                        "heartbeats (129,600/day here) itself, without sending it upstream.")
        text = format_report(rep)
        assert [ln for ln in text.splitlines() if "saver" in ln.lower()] == [f"Hint: {hint}"]
        assert "Saved by the proxy" not in text
    # only polling: the hint names only it
    rep = build_report(traffic(CELERY_ROWS[:1], []), None)
    assert "Celery's queue polling (86,400/day here)" in rep["saved"]["hint"]


def test_savers_on_but_nothing_saved_is_one_line_and_no_hint() -> None:
    rep = build_report(traffic(CELERY_ROWS, [], savers=["ping"]), None)
    assert rep["saved"]["hint"] is None
    text = format_report(rep)
    assert [ln for ln in text.splitlines() if "saver" in ln.lower()] == ["Savers on (ping): nothing saved over 10.0m."]


def test_saved_and_celery_traffic_left_no_hint() -> None:
    rep = build_report(traffic(CELERY_ROWS, [("worker", "brpop", "poll", 5000)]), None)
    assert rep["saved"]["hint"] is None and "Hint:" not in format_report(rep)


# -------------------------------------------------------------------------------------------------
# the stored report: saved counts persist per day with the usage state
# -------------------------------------------------------------------------------------------------


def test_saved_counts_are_flushed_and_read_back_by_the_stopped_proxys_report(tmp_path: Path) -> None:
    clock = Clock(START)
    stats = tracked_stats(clock)
    limits = Limits(CapConfig(), [], Store(tmp_path, clock=clock), clock=clock, stats=stats)
    for i in range(120):  # two minutes: a poll saved a second, a BRPOP upstream every 10 s
        clock.t += 1
        stats.count_saved("worker", "brpop", "poll")
        if i % 10 == 0:  # as the session counts a forwarded command
            stats.patterns.add("worker", "brpop", "celery timeout=1")
            stats.count_upstream("worker", "brpop")
        limits.flush()
    stats.count_saved("beat", "ping", "ping", 7)
    limits.close()  # the last deltas go on exit

    reader = Limits(CapConfig(), [], Store(tmp_path, owner="reader"), clock=clock)
    t = stored_traffic(reader.store, reader)
    assert t["saved"] == [{"client": "worker", "command": "brpop", "saver": "poll", "count": 120},
                          {"client": "beat", "command": "ping", "saver": "ping", "count": 7}]
    assert t["rows"] == [{"client": "worker", "command": "brpop", "pattern": "celery timeout=1", "count": 12}]
    assert t["saved_measured_seconds"] == t["measured_seconds"]
    rep = build_report(t, reader.snapshot_readonly(), now=clock.t)
    assert rep["saved"]["count"] == 127 and rep["saved"]["savers"] is None
    assert rep["totals"]["used_today"] == 12  # the usage (billable) is only what went upstream
    text = format_report(rep)
    assert "Saved by the proxy: answered locally, never sent upstream" in text
    assert "respmeter report (state directory, today" in text


def test_flushes_do_not_count_a_saving_twice(tmp_path: Path) -> None:
    clock = Clock(START)
    stats = Stats()
    store = Store(tmp_path, clock=clock)
    limits = Limits(CapConfig(), [], store, clock=clock, stats=stats)
    stats.count_saved("w", "publish", "events", 3)
    limits.flush()
    limits.flush()
    stats.count_saved("w", "publish", "events", 2)
    clock.t += 5
    limits.flush()
    (row,) = store.saved(limits.win_ids["daily"])
    assert row[:4] == ("w", "publish", "events", 5)
    assert [r[:4] for r in store.saved(limits.win_ids["monthly"])] == [("w", "publish", "events", 5)]


# -------------------------------------------------------------------------------------------------
# the dashboard
# -------------------------------------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD_JSON.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p.get("type") != "row" for t in p["targets"]]


def test_dashboard_has_saved_panels_on_the_exported_metric() -> None:
    s = Stats()
    s.count_saved("w", "ping", "ping")
    exported = {x.name for f in text_string_to_metric_families(exposition(s)) for x in f.samples}
    assert METRIC in exported

    targets = dashboard_targets()
    saved = [(title, e) for title, e in targets if "saved_commands" in e]
    assert saved, "no panel shows the saved commands"
    for title, e in saved:  # the exact name users' dashboards depend on, never a near miss
        assert set(re.findall(r"respmeter_saved_commands\w*", e)) == {METRIC}, (title, e)
    by_title = {}
    for title, e in targets:
        by_title.setdefault(title, []).append(e)
    (per_saver,) = by_title["Saved commands/s by saver"]
    assert re.fullmatch(rf"sum by \(saver\) \(rate\({METRIC}\{{[^}}]*\}}\[\$__rate_interval\]\)\)", per_saver), per_saver
    versus = by_title["Saved vs upstream commands/s"]
    assert any(METRIC in e for e in versus) and any("respmeter_upstream_commands_total" in e for e in versus)
    (table,) = by_title["Saved commands by saver and command (selected time range)"]
    assert f"sum by (saver, command) (increase({METRIC}" in table
    # the panels follow the dashboard's variables, as every other panel does
    for _, e in saved:
        assert 'job=~"$job",instance=~"$instance",client=~"$client",command=~"$command"' in e, e


# -------------------------------------------------------------------------------------------------
# end to end: a proxy with --savers ping, its /api/traffic and `respmeter report`
# -------------------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def test_a_running_proxy_reports_what_it_saved(redis_server, proxy_factory, tmp_path: Path) -> None:
    proxy = proxy_factory(redis_server, ["--savers", "ping", "--state-dir", str(tmp_path / "state")])
    c = proxy.client(client_name="app")
    c.set("saved:k", 1)  # the upstream has just replied: PING is answered by the proxy
    for _ in range(20):
        assert c.ping()
    c.get("saved:k")
    metrics = proxy.metrics_text()
    assert f'{METRIC}{{client="app",command="ping",saver="ping"}} 20.0' in metrics, metrics

    status, body = proxy.http_get("/api/traffic?window=600")
    assert status == 200, body
    t = json.loads(body)
    assert t["saved"] == [{"client": "app", "command": "ping", "saver": "ping", "count": 20}], t
    assert t["savers"] == ["ping"]  # cli.py passes the savers on to live_traffic
    assert "ping" not in {r["command"] for r in t["rows"]}  # the rows are what went upstream

    admin = f"127.0.0.1:{proxy.admin_port}"
    r = cli("report", "--admin", admin, "--window", "10m", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["saved"]["count"] == 20 and rep["saved"]["by_saver"][0]["saver"] == "ping"
    r = cli("report", "--admin", admin, "--window", "10m")
    assert r.returncode == 0, r.stderr
    assert "Saved by the proxy (savers on: ping): answered locally, never sent upstream" in r.stdout, r.stdout
    assert re.search(r"^ +[\d,]+ +20  ping +ping$", r.stdout, re.M), r.stdout

    # the stopped proxy's state keeps it for the report of the day
    proxy.terminate()
    r = cli("report", "--state-dir", str(tmp_path / "state"), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["saved"]["rows"]
    assert [(x["client"], x["command"], x["saver"], x["count"]) for x in rows] == [("app", "ping", "ping", 20)]


def test_sources_a_saver_governs_get_no_setting_advice_while_it_is_on():
    """With the events saver on, the heartbeat's upstream rate is its recheck, not the worker's
    heartbeat interval: the report must not promise a saving from --heartbeat-interval."""
    from proxy.explain import build_report

    rows = [{"client": "celery", "command": "publish", "pattern": "/0.celeryev/worker.heartbeat",
             "count": 3, "first": 0.0, "last": 180.0}]
    base = {"rows": rows, "measured_seconds": 180.0}
    off = build_report(dict(base, savers=[]), None)
    on = build_report(dict(base, savers=["events", "poll"]), None)
    hb_off = next(s for s in off["sources"] if s["id"] == "celery.heartbeat")
    hb_on = next(s for s in on["sources"] if s["id"] == "celery.heartbeat")
    assert hb_off["knobs"] and any("--heartbeat-interval" in k["setting"] for k in hb_off["knobs"])
    assert hb_on["knobs"] == []
    assert hb_on["notes"][0].startswith("the events saver already answers these")


def test_top_shows_what_each_saver_answers():
    from proxy.top import frame

    base = {"by_command": {"get": 10}, "by_client": {"w": 10}, "outcomes": {"local": 0}, "throttled": {},
            "up": 1.0, "connections": 2}
    prev = dict(base, t=0.0, saved={"poll": 100, "events": 10})
    cur = dict(base, t=2.0, saved={"poll": 104, "events": 11}, outcomes={"local": 5})
    text = "\n".join(frame(prev, cur))
    assert "saved/s (never sent upstream): events 0.5  poll 2.0   saved total 115" in text
    assert "saved/s" not in "\n".join(frame(dict(base, t=0.0, saved={}), dict(base, t=1.0, saved={})))
