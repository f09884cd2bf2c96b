"""Traffic explanation rules (proxy/sources.toml) on hand-made traffic tables: no guesses."""

from __future__ import annotations

import datetime
import re

import pytest

from proxy.explain import RulesError, build_report, load_evidence, load_sources
from proxy.report import format_report


def table(rows: list[tuple[str, str, int]], seconds: float = 600) -> dict:
    return {
        "window_seconds": seconds,
        "measured_seconds": seconds,
        "from": "live",
        "rows": [{"client": "anonymous", "command": c, "pattern": p, "count": n} for c, p, n in rows],
    }


def test_generic_shapes_are_not_called_celery_without_celery() -> None:
    # what redis-cli and a small app send: nothing says Celery
    rep = build_report(table([("multi", "-", 5), ("exec", "-", 5), ("subscribe", "-", 2), ("client|setname", "-", 3),
                              ("set", "app:user:*", 40)]), None)
    by_cmd = {r["command"]: r["source"] for r in rep["rows"]}
    assert by_cmd["multi"] is None and by_cmd["exec"] is None and by_cmd["subscribe"] is None
    assert by_cmd["set"] is None
    assert by_cmd["client|setname"] == "redis_py.handshake"  # any client's handshake
    assert rep["ineffective_settings"] == []  # no Celery advice without Celery


def test_generic_shapes_join_celery_when_celery_is_there() -> None:
    rep = build_report(table([("brpop", "celery celery\\x06\\x16* timeout=1", 600), ("multi", "-", 5), ("exec", "-", 5),
                              ("psubscribe", "-", 2)]), None)
    by_cmd = {r["command"]: r["source"] for r in rep["rows"]}
    assert by_cmd == {"brpop": "celery.broker_polling", "multi": "kombu.transactions", "exec": "kombu.transactions",
                      "psubscribe": "celery.pubsub"}
    assert any(x["setting"] == "broker_heartbeat" for x in rep["ineffective_settings"])
    polling = next(s for s in rep["sources"] if s["id"] == "celery.broker_polling")
    assert polling["per_day"] == 86400
    knob = next(k for k in polling["knobs"] if "'polling_interval': 30" in k["setting"])
    assert knob["saving_per_day"] == round(86400 * (1 - 1 / 30))


def test_sources_file_loads_and_ids_are_unique() -> None:
    sources = load_sources()
    ids = [s.id for s in sources]
    assert len(ids) == len(set(ids)) >= 15
    for s in sources:
        assert s.name and s.description and s.match


def rows_of(rows: list[tuple[str, str, str, int]], seconds: float = 600) -> dict:
    return {
        "window_seconds": seconds,
        "measured_seconds": seconds,
        "from": "live",
        "rows": [{"client": cl, "command": c, "pattern": p, "count": n} for cl, c, p, n in rows],
    }


def sources_by_row(rep: dict) -> dict[tuple[str, str, str], str | None]:
    return {(r["client"], r["command"], r["pattern"]): r["source"] for r in rep["rows"]}


def test_celery_names_need_evidence_from_the_same_client_label() -> None:
    """A BRPOP loop, PING and MULTI/EXEC are Celery's only for a client that also shows Celery's own
    traces; another client's identical shapes get generic names, whatever the first one does."""
    rep = build_report(rows_of([
        ("worker", "brpop", "celery celery\\x06\\x16* timeout=1", 600),
        ("worker", "publish", "/*.celeryev/worker.heartbeat", 300),
        ("worker", "ping", "-", 24),
        ("worker", "multi", "-", 4),
        ("web", "brpop", "jobs timeout=1", 600),
        ("web", "ping", "-", 10),
        ("web", "multi", "-", 5),
        ("web", "exec", "-", 5),
        ("web", "psubscribe", "-", 1),
    ]), None)
    got = sources_by_row(rep)
    assert got[("worker", "brpop", "celery celery\\x06\\x16* timeout=1")] == "celery.broker_polling"
    assert got[("worker", "ping", "-")] == "redis_py.health_check"
    assert got[("worker", "multi", "-")] == "kombu.transactions"
    assert got[("web", "brpop", "jobs timeout=1")] == "generic.blocking_poll"
    assert got[("web", "ping", "-")] == "generic.ping"
    assert got[("web", "multi", "-")] is None and got[("web", "exec", "-")] is None
    assert got[("web", "psubscribe", "-")] is None
    poll = next(s for s in rep["sources"] if s["id"] == "generic.blocking_poll")
    assert poll["name"] == "blocking-pop polling, 1 s timeout" and "instances_estimate" not in poll
    assert poll["clients"] == ["web"] and "Celery" not in poll["name"]
    celery = next(s for s in rep["sources"] if s["id"] == "celery.broker_polling")
    assert celery["clients"] == ["worker"] and celery["instances_estimate"] == 1.0
    assert rep["evidence"] == [{"client": "worker", "software": "Celery/kombu",
                                "seen": ["Celery event channels (celeryev)", "kombu priority queues"]}]
    assert rep["ineffective_settings"]  # Celery is there (for the worker)


def test_no_celery_no_celery_names() -> None:
    """The issue's examples: a plain BRPOP … 1 loop on a queue called celery, redis-cli's PING, a
    hand-written MULTI/EXEC, and a redis-py client's handshake: nothing says Celery."""
    rep = build_report(rows_of([
        ("anonymous", "brpop", "celery timeout=1", 60),
        ("anonymous", "ping", "-", 3),
        ("anonymous", "ping", "redis-py-health-check", 2),
        ("anonymous", "multi", "-", 2),
        ("anonymous", "exec", "-", 2),
        ("anonymous", "client|setinfo", "redis-py", 1),
        ("anonymous", "lpush", "celery", 4),
    ], seconds=60), None)
    got = sources_by_row(rep)
    assert got[("anonymous", "brpop", "celery timeout=1")] == "generic.blocking_poll"
    assert got[("anonymous", "ping", "-")] == "generic.ping"
    assert got[("anonymous", "ping", "redis-py-health-check")] == "redis_py.pubsub_health"
    assert got[("anonymous", "multi", "-")] is None and got[("anonymous", "lpush", "celery")] is None
    assert got[("anonymous", "client|setinfo", "redis-py")] == "redis_py.handshake"
    assert not [s for s in rep["sources"] if "celery" in s["software"].lower() or "kombu" in s["software"].lower()]
    assert rep["evidence"] == [] and rep["ineffective_settings"] == []
    text = format_report(rep)
    words = text.split("\n share ")[0]  # all but the table, whose key patterns are the app's own ("celery")
    assert "celery" not in words.lower() and "kombu" not in words.lower(), words
    assert "Settings that do nothing" not in text
    assert "blocking-pop polling, 1 s timeout" in text


def test_a_celery_library_name_is_evidence() -> None:
    """Celery's result backend names itself (CLIENT SETINFO LIB-NAME redis-py(celery_v5.7.0))."""
    rep = build_report(rows_of([
        ("anonymous", "brpop", "celery timeout=1", 600),
        ("anonymous", "client|setinfo", "redis-py(celery_v*.*.*)", 1),
    ]), None)
    assert sources_by_row(rep)[("anonymous", "brpop", "celery timeout=1")] == "celery.broker_polling"
    assert rep["evidence"][0]["seen"] == ["a Celery library name (CLIENT SETINFO LIB-NAME)"]


def test_generic_blocking_poll_knob_starts_from_its_timeout() -> None:
    rep = build_report(rows_of([("app", "blpop", "jobs:* timeout=5", 120), ("app", "brpop", "mail timeout=0", 3)]),
                       None)
    got = sources_by_row(rep)
    assert got[("app", "brpop", "mail timeout=0")] is None  # waits for ever: not polling
    poll = next(s for s in rep["sources"] if s["id"] == "generic.blocking_poll")
    assert poll["name"] == "blocking-pop polling, 5 s timeout"
    knob = poll["knobs"][0]
    assert knob["saving_per_day"] == round(poll["per_day"] * (1 - 5 / 30)) and "instead of per 5 s" in knob["effect"]


def test_per_task_rows_are_not_restore_rows() -> None:
    """The issue's case: 20 tasks made kombu's restore "61,920/day" and its knob "saves ~51,600/day";
    the restore sweep is SET/ZRANGE/EVALSHA on unacked_mutex / unacked_index every ~100 s."""
    seconds = 300
    rep = build_report(rows_of([
        ("anonymous", "brpop", "celery celery\\x06\\x16* timeout=1", 300),
        ("anonymous", "zadd", "unacked_index", 20),
        ("anonymous", "hset", "unacked", 20),
        ("anonymous", "zrem", "unacked_index", 20),
        ("anonymous", "hdel", "unacked", 20),
        ("anonymous", "set", "unacked_mutex", 3),
        ("anonymous", "zrange", "unacked_index", 3),
        ("anonymous", "evalsha", "unacked_mutex", 3),
    ], seconds=seconds), None)
    by_id = {s["id"]: s for s in rep["sources"]}
    restore = by_id["kombu.unacked_restore"]
    assert restore["count"] == 9 and restore["commands"] == ["evalsha", "set", "zrange"]
    assert restore["per_day"] == round(9 / seconds * 86400)  # 2,592/day: one sweep per 100 s
    knob = restore["knobs"][0]
    assert "unacked_restore_interval" in knob["setting"]
    assert knob["saving_per_day"] == round(9 / seconds * 86400 * (1 - 100 / 600))
    per_task = by_id["kombu.per_task"]
    assert per_task["count"] == 80 and per_task["commands"] == ["hdel", "hset", "zadd", "zrem"]
    assert per_task["knobs"] == [] and "per task" in per_task["name"]
    assert any("scales with the number of tasks" in n for n in per_task["notes"])


def usage(daily_used: int, daily_cap: int | None, month_used: int, month_cap: int | None) -> dict:
    return {"windows": {
        "daily": {"used": daily_used, "cap": daily_cap, "resets_at": "2026-11-29T00:00:00+00:00"},
        "monthly": {"used": month_used, "cap": month_cap, "resets_at": "2026-12-01T00:00:00+00:00"},
    }}


NOW = datetime.datetime(2026, 11, 28, 6, 0, tzinfo=datetime.timezone.utc).timestamp()


def test_wording_projections_dates_and_short_windows() -> None:
    """A projection says so ("at this rate, reached on 30 Nov 08:00 UTC"), not an ISO time under
    "Monthly cap reached:"; one daily projection (the rate), not a second "by midnight" figure that
    disagrees with it; a short window says that it is carried to a whole day."""
    # 100 commands a minute: 144,000/day; month: 200,000 used of 500,000 -> 300,000 more in 2.083 days
    rep = build_report(rows_of([("app", "get", "k:*", 100)], seconds=60), usage(50_000, 150_000, 200_000, 500_000),
                       now=NOW)
    t = rep["totals"]
    assert t["monthly_cap_hit_at"].startswith("2026-11-30T08:00")
    assert t["daily_cap_hit_at"].startswith("2026-11-28T22:40")  # 100,000 more at 6,000/h: 16 h 40 min
    text = format_report(rep)
    print(text)
    head = text.split("\n\n")[1]
    assert "Total: 100/min, 6,000/hour; at this rate 144,000/day, ~4,320,000/month" in head
    assert ("Projected from only 1.0m of traffic (x1,440 for a day): a burst or a start-up in it counts as if it went "
            "on all day.") in head
    assert "Today: 50,000 used of 150,000 cap; at this rate, reached on 28 Nov 22:40 UTC" in head
    assert "This month: 200,000 used of 500,000 cap; at this rate, reached on 30 Nov 08:00 UTC" in head
    assert "projected by midnight" not in text and "T08:00" not in text and "Monthly cap reached" not in text
    assert len(re.findall(r"[\d,]+/day", head)) == 1, head  # one daily projection


def test_wording_daily_cap_and_a_full_window() -> None:
    rep = build_report(rows_of([("app", "get", "k:*", 360_000)], seconds=3600), usage(20_000, 150_000, 20_000, None),
                       now=NOW)
    assert rep["totals"]["daily_cap_hit_at"].startswith("2026-11-28T06:21:40")  # 130,000 more at 100/s
    text = format_report(rep)
    assert "Today: 20,000 used of 150,000 cap; at this rate, reached on 28 Nov 06:21 UTC" in text, text
    assert "This month: 20,000 used (no cap)" in text
    assert "Projected from only" not in text  # an hour of traffic is not a burst
    rep = build_report(rows_of([("app", "get", "k:*", 10)], seconds=3600), usage(150_000, 150_000, 0, 10**9), now=NOW)
    text = format_report(rep)
    assert "Today: 150,000 used of 150,000 cap; reached, until it resets on 29 Nov 00:00 UTC" in text, text
    assert ("This month: 0 used of 1,000,000,000 cap; at this rate, not reached before it resets on 1 Dec 00:00 UTC"
            in text)


def test_a_window_longer_than_the_proxy_has_run_says_so() -> None:
    table = rows_of([("app", "get", "k:*", 90)], seconds=90)
    table["window_seconds"] = 600
    rep = build_report(table, None, now=NOW)
    assert rep["window"]["covers_requested"] is False and rep["window"]["day_multiplier"] == 960.0
    assert "The proxy has counted for 1.5m of the 10.0m asked for." in format_report(rep)


def test_rules_name_only_known_evidence() -> None:

    assert [e.id for e in load_evidence()] == ["celery"]
    assert {s.id for s in load_sources() if s.needs} >= {"celery.broker_polling", "kombu.transactions",
                                                          "redis_py.health_check", "kombu.subclient_health"}
    bad = '[[source]]\nid = "x"\nname = "x"\nneeds = ["nope"]\nmatch = [{ command = "get" }]\n'
    with pytest.raises(RulesError, match="unknown evidence"):
        load_sources(bad)


def test_per_connection_handshakes_point_to_the_upstream_pool() -> None:
    """A web app connecting per request: its handshakes are a source, and the first knob is the
    proxy's own --upstream-pool (no client change), saving all of it; with the pool on, that knob
    is gone and a note says what still goes upstream."""
    rows = [("hello", "", 600), ("client|setinfo", "", 1200), ("client|maint_notifications", "", 600),
            ("get", "page:*", 600)]
    rep = build_report(table(rows), None)
    hs = next(s for s in rep["sources"] if s["id"] == "redis_py.handshake")
    assert hs["count"] == 2400
    pool = hs["knobs"][0]
    assert "--upstream-pool" in pool["setting"] and pool["saving_per_day"] == hs["per_day"] == 345_600
    on = build_report({**table(rows), "upstream_pool": 4}, None)
    hs_on = next(s for s in on["sources"] if s["id"] == "redis_py.handshake")
    assert not any("--upstream-pool" in k["setting"] for k in hs_on["knobs"]) and len(hs_on["knobs"]) == 2
    assert hs_on["notes"][0].startswith("the upstream pool (--upstream-pool 4) answers the handshake")
    assert "--upstream-pool 4" in format_report(on)


def test_long_command_names_keep_the_table_in_columns() -> None:
    """client|maint_notifications (27 characters) no longer pushes its row out of line."""
    rep = build_report(rows_of([
        ("anonymous", "client|maint_notifications", "-", 5),
        ("anonymous", "get", "user:*", 50),
    ], seconds=60), None)
    lines = format_report(rep).splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("share"))
    table = lines[head:head + 3]
    # each row's key pattern starts where the header's does
    col = table[0].index("key pattern")
    assert sorted(row[col:].split()[0] for row in table[1:]) == ["-", "user:*"], table
    assert all(row[col - 1] == " " for row in table[1:]), table


def test_usage_keeps_its_numbers_in_one_column() -> None:
    from proxy.report import format_usage

    def window(wid: str) -> dict:
        return {"id": wid, "resets_at": "later", "used": 13, "cap": None, "remaining": None, "projected": 20,
                "clients": {"celery-worker-with-a-long-name": {"used": 10, "cap": None, "remaining": None},
                            "web": {"used": 3, "cap": None, "remaining": None}},
                "commands": {"client|maint_notifications": 5, "get": 8}}

    text = format_usage({"generated_at": "now", "timezone": "UTC",
                         "windows": {"daily": window("2026-12-06"), "monthly": window("2026-12")}})
    for names in (("celery-worker-with-a-long-name", "web"), ("client|maint_notifications", "get")):
        rows = [ln for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in names][:2]
        assert len({len(r) for r in rows}) == 1, rows  # (numbers right-aligned in one column)
