"""Traffic explanation rules (proxy/sources.toml) on hand-made traffic tables: no guesses."""

from __future__ import annotations

from proxy.explain import build_report, load_sources


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
