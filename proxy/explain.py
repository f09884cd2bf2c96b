"""Where the traffic comes from and what cuts it: the data behind ``respmeter report``.

Input is a traffic table, rows of (client, command, key pattern, count) measured over a span of
seconds, from a running proxy (``/api/traffic``) or from a stopped one's state directory. Sources are
recognised by the rules in ``sources.toml`` (data, not code); anything no rule claims is shown as
unrecognised, never forced into a guess.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

REPORT_VERSION = 1
UPSTASH_FREE_MONTHLY = 500_000
DAY = 86400.0


@dataclass
class Knob:
    setting: str
    effect: str
    keep: float | None = None
    interval: float | None = None


@dataclass
class Source:
    id: str
    name: str
    software: str
    description: str
    match: list[tuple[str, re.Pattern[str]]]
    group: tuple[frozenset[str], int] | None = None
    requires: tuple[str, ...] = ()
    per_instance_per_day: float | None = None
    period: float | None = None
    knobs: list[Knob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RulesError(ValueError):
    pass


def load_sources(text: str | None = None) -> list[Source]:
    if text is None:
        text = resources.files("proxy").joinpath("sources.toml").read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"sources.toml: {exc}") from None
    out = []
    ids = set()
    for i, s in enumerate(data.get("source", [])):
        try:
            sid = s["id"]
            if sid in ids:
                raise RulesError(f"duplicate source id {sid}")
            ids.add(sid)
            group = None
            if "group" in s:
                group = (frozenset(s["group"]["commands"]), int(s["group"]["min"]))
            out.append(
                Source(
                    id=sid,
                    name=s["name"],
                    software=s.get("software", ""),
                    description=s.get("description", ""),
                    match=[(m["command"], re.compile(m.get("pattern", ""))) for m in s["match"]],
                    group=group,
                    requires=tuple(s.get("requires", ())),
                    per_instance_per_day=s.get("per_instance_per_day"),
                    period=s.get("period"),
                    knobs=[Knob(k["setting"], k["effect"], k.get("keep"), k.get("interval")) for k in s.get("knobs", [])],
                    notes=list(s.get("notes", [])),
                )
            )
        except (KeyError, TypeError, re.error) as exc:
            raise RulesError(f"sources.toml: source #{i + 1}: {exc}") from None
    return out


def classify(rows: list[dict[str, Any]], sources: list[Source]) -> list[str | None]:
    """The source id of each row (None: unrecognised). Sources with ``requires`` claim rows only when
    a source they name was recognised without them (a second pass)."""
    by_pattern: dict[str, set[str]] = {}
    for r in rows:
        by_pattern.setdefault(r["pattern"], set()).add(r["command"])
    first = _classify(rows, [s for s in sources if not s.requires], by_pattern)
    seen = {sid for sid in first if sid is not None}
    allowed = [s for s in sources if not s.requires or any(x.startswith(s.requires) for x in seen)]
    return _classify(rows, allowed, by_pattern)


def _classify(rows: list[dict[str, Any]], sources: list[Source], by_pattern: dict[str, set[str]]) -> list[str | None]:
    out: list[str | None] = []
    for r in rows:
        found = None
        for s in sources:
            if not any(fnmatch.fnmatchcase(r["command"], cmd) and pat.search(r["pattern"]) for cmd, pat in s.match):
                continue
            if s.group is not None:
                cmds, least = s.group
                if len(by_pattern[r["pattern"]] & cmds) < least:
                    continue
            found = s.id
            break
        out.append(found)
    return out


def _timeout(pattern: str) -> float | None:
    m = re.search(r" timeout=([0-9.]+)$", pattern)
    if not m:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


def build_report(
    traffic: dict[str, Any],
    usage: dict[str, Any] | None,
    *,
    sources: list[Source] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The report as a dict (the documented ``--json`` output)."""
    sources = sources if sources is not None else load_sources()
    now = time.time() if now is None else now
    span = max(1.0, float(traffic.get("measured_seconds") or 1.0))
    rows_in = traffic.get("rows", [])
    total = sum(r["count"] for r in rows_in) or 0
    ids = classify(rows_in, sources)
    rows = []
    for r, sid in zip(rows_in, ids):
        per_s = r["count"] / span
        rows.append(
            {
                "client": r["client"],
                "command": r["command"],
                "pattern": r["pattern"],
                "count": r["count"],
                "per_minute": round(per_s * 60, 2),
                "per_hour": round(per_s * 3600, 1),
                "per_day": round(per_s * DAY),
                "share": round(r["count"] / total, 4) if total else 0.0,
                "source": sid,
            }
        )
    by_id = {s.id: s for s in sources}
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        sid = row["source"]
        if sid is None:
            continue
        f = found.setdefault(sid, {"count": 0, "rows": []})
        f["count"] += row["count"]
        f["rows"].append(row)
    out_sources = []
    for sid, f in sorted(found.items(), key=lambda kv: -kv[1]["count"]):
        s = by_id[sid]
        per_day = f["count"] / span * DAY
        knobs = []
        for k in s.knobs:
            if k.keep is not None:
                keep = k.keep
            elif k.interval:
                # the current period: BRPOP's own timeout when the pattern shows it, else the default
                current = None
                timeouts = [_timeout(r["pattern"]) for r in f["rows"]]
                timeouts = [t for t in timeouts if t]
                if timeouts:
                    current = max(timeouts)
                current = current or s.period or k.interval
                keep = min(1.0, current / k.interval)
            else:
                keep = 1.0
            knobs.append(
                {
                    "setting": k.setting,
                    "effect": k.effect,
                    "saving_per_day": round(per_day * (1 - keep)),
                    "saving_per_month": round(per_day * (1 - keep) * 30),
                }
            )
        entry = {
            "id": sid,
            "name": s.name,
            "software": s.software,
            "description": s.description,
            "count": f["count"],
            "share": round(f["count"] / total, 4) if total else 0.0,
            "per_day": round(per_day),
            "commands": sorted({r["command"] for r in f["rows"]}),
            "knobs": knobs,
            "notes": s.notes,
        }
        if s.per_instance_per_day:
            entry["instances_estimate"] = round(per_day / s.per_instance_per_day, 1)
        out_sources.append(entry)
    unrec = [r for r in rows if r["source"] is None]
    unrec_count = sum(r["count"] for r in unrec)
    per_day_total = total / span * DAY

    totals: dict[str, Any] = {
        "commands": total,
        "per_minute": round(total / span * 60, 2),
        "per_hour": round(total / span * 3600, 1),
        "per_day": round(per_day_total),
        "per_month": round(per_day_total * 30),
        "upstash_free_monthly": UPSTASH_FREE_MONTHLY,
        "upstash_free_share": round(per_day_total * 30 / UPSTASH_FREE_MONTHLY, 3),
    }
    if usage:
        daily = usage["windows"]["daily"]
        monthly = usage["windows"]["monthly"]
        totals.update(
            used_today=daily["used"],
            daily_cap=daily["cap"],
            used_month=monthly["used"],
            monthly_cap=monthly["cap"],
            projected_today=round(daily["used"] + per_day_total * _left(daily, now) / DAY),
            projected_month=round(monthly["used"] + per_day_total * _left(monthly, now) / DAY),
        )
        for key, cap in (("monthly_cap_hit_at", monthly["cap"]), ("upstash_free_hit_at", UPSTASH_FREE_MONTHLY)):
            totals[key] = _hit_at(monthly["used"], cap, per_day_total, now, monthly)
    celery = any(s["software"].startswith(("celery", "kombu")) for s in out_sources)
    report = {
        "version": REPORT_VERSION,
        "generated_at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(),
        "window": {
            "requested_seconds": traffic.get("window_seconds"),
            "measured_seconds": round(span, 1),
            "from": traffic.get("from", "live"),
        },
        "totals": totals,
        "sources": out_sources,
        "unrecognised": {"count": unrec_count, "share": round(unrec_count / total, 4) if total else 0.0},
        "rows": rows,
        "ineffective_settings": INEFFECTIVE if celery else [],
    }
    return report


INEFFECTIVE = [
    {"setting": "broker_heartbeat", "fact": "AMQP only: it sends nothing and saves nothing on Redis."},
    {"setting": "broker_transport_options['max_sleep_time']", "fact": "no effect on the Redis transport's traffic."},
    {"setting": "broker_transport_options['heartbeat']", "fact": "no effect on Redis traffic."},
]


def _left(window: dict[str, Any], now: float) -> float:
    end = dt.datetime.fromisoformat(window["resets_at"]).timestamp()
    return max(0.0, end - now)


def _hit_at(used: int, cap: int | None, per_day: float, now: float, window: dict[str, Any]) -> str | None:
    """When the cap is reached at the current rate (None: not before the window resets)."""
    if not cap:
        return None
    if used >= cap:
        return dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
    if per_day <= 0:
        return None
    t = now + (cap - used) / per_day * DAY
    if t > dt.datetime.fromisoformat(window["resets_at"]).timestamp():
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def live_traffic(stats: Any, limits: Any, window: float) -> dict[str, Any]:
    """The traffic table of a running proxy over the last ``window`` seconds."""
    tracker = stats.patterns
    rows = []
    span = 0.0
    if tracker is not None:
        counts, span = tracker.window(window)
        for (client, cmd, pat), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append({"client": client, "command": cmd, "pattern": pat, "count": n})
    return {"window_seconds": window, "measured_seconds": round(span, 1), "rows": rows, "from": "live",
            "tracking": tracker is not None}


def stored_traffic(store: Any, limits: Any) -> dict[str, Any]:
    """The traffic table of a stopped proxy: today's counts, over the time they were seen."""
    win = limits.win_ids["daily"]
    rows = []
    first = last = None
    for client, cmd, pat, n, f, la in store.patterns(win):
        rows.append({"client": client, "command": cmd, "pattern": pat, "count": n})
        first = f if first is None else min(first, f)
        last = la if last is None else max(last, la)
    rows.sort(key=lambda r: (-r["count"], r["client"], r["command"], r["pattern"]))
    # the time the proxy ran today (not just from the first to the last command seen): idle time
    # counts, or a short burst would be projected as if it went on all day
    day_start = limits.bounds["daily"][0]
    for a, b in store.alive_spans():
        if b >= day_start and first is not None:
            first = min(first, max(a, day_start))
            last = max(last, b)
    span = (last - first) if first is not None and last is not None else 0.0
    return {"window_seconds": None, "measured_seconds": round(max(span, 1.0), 1), "rows": rows, "from": "state"}
