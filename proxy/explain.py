"""Where the traffic comes from and what cuts it: the data behind ``respmeter report``.

Input is a traffic table, rows of (client, command, key pattern, count) measured over a span of
seconds, from a running proxy (``/api/traffic``) or from a stopped one's state directory. Sources are
recognised by the rules in ``sources.toml`` (data, not code); anything no rule claims is shown as
unrecognised, never forced into a guess.

Shapes any client can send (a BRPOP loop, PING, MULTI/EXEC) are put down to Celery or kombu only
when the same client label also shows Celery's own traces (``[[evidence]]`` in ``sources.toml``:
kombu's keys, Celery's event or pidbox channels, kombu's priority queues, a Celery library name);
otherwise they get a generic name.
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
    needs: tuple[str, ...] = ()
    per_instance_per_day: float | None = None
    period: float | None = None
    knobs: list[Knob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Evidence:
    """What shows that a client label is a given software (rows of that client matching a clause)."""

    id: str
    name: str
    match: list[tuple[str, re.Pattern[str], str]]  # (command glob, pattern regex, what was seen)


class RulesError(ValueError):
    pass


def _rules(text: str | None) -> dict[str, Any]:
    if text is None:
        text = resources.files("proxy").joinpath("sources.toml").read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"sources.toml: {exc}") from None


def load_evidence(text: str | None = None) -> list[Evidence]:
    out = []
    for i, e in enumerate(_rules(text).get("evidence", [])):
        try:
            match = [(m["command"], re.compile(m["pattern"]), m["seen"]) for m in e["match"]]
            out.append(Evidence(e["id"], e["name"], match))
        except (KeyError, TypeError, re.error) as exc:
            raise RulesError(f"sources.toml: evidence #{i + 1}: {exc}") from None
    return out


def load_sources(text: str | None = None) -> list[Source]:
    data = _rules(text)
    known = {e.get("id") for e in data.get("evidence", []) if isinstance(e, dict)}
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
            needs = tuple(s.get("needs", ()))
            unknown = set(needs) - known
            if unknown:
                raise RulesError(f"source {sid}: needs unknown evidence {sorted(unknown)}")
            out.append(
                Source(
                    id=sid,
                    name=s["name"],
                    software=s.get("software", ""),
                    description=s.get("description", ""),
                    match=[(m["command"], re.compile(m.get("pattern", ""))) for m in s["match"]],
                    group=group,
                    needs=needs,
                    per_instance_per_day=s.get("per_instance_per_day"),
                    period=s.get("period"),
                    knobs=[Knob(k["setting"], k["effect"], k.get("keep"), k.get("interval")) for k in s.get("knobs", [])],
                    notes=list(s.get("notes", [])),
                )
            )
        except (KeyError, TypeError, re.error) as exc:
            raise RulesError(f"sources.toml: source #{i + 1}: {exc}") from None
    return out


def evidence_by_client(rows: list[dict[str, Any]], evidence: list[Evidence]) -> dict[str, dict[str, list[str]]]:
    """client label -> evidence id -> what was seen (in rule order), from that client's own rows."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        for e in evidence:
            for cmd, pat, seen in e.match:
                if fnmatch.fnmatchcase(r["command"], cmd) and pat.search(r["pattern"]):
                    got = out.setdefault(r["client"], {}).setdefault(e.id, [])
                    if seen not in got:
                        got.append(seen)
    for by_id in out.values():
        for e in evidence:
            if e.id in by_id:
                order = [seen for _, _, seen in e.match]
                by_id[e.id].sort(key=order.index)
    return out


def classify(
    rows: list[dict[str, Any]], sources: list[Source], evidence: list[Evidence] | None = None
) -> list[str | None]:
    """The source id of each row (None: unrecognised). A source that ``needs`` evidence claims a
    row only when the row's client label shows that evidence in its own rows."""
    seen = evidence_by_client(rows, load_evidence() if evidence is None else evidence)
    by_pattern: dict[str, set[str]] = {}
    for r in rows:
        by_pattern.setdefault(r["pattern"], set()).add(r["command"])
    out: list[str | None] = []
    for r in rows:
        found = None
        has = seen.get(r["client"], {})
        for s in sources:
            if s.needs and not all(e in has for e in s.needs):
                continue
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


def _seconds(values: list[float]) -> str:
    """1 -> '1 s'; 1, 5 -> '1 s and 5 s'; 1, 5, 30 -> '1 s, 5 s and 30 s'."""
    words = [f"{v:g} s" for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


# the source whose commands the upstream pool answers for the clients on it (--upstream-pool)
POOL_GOVERNED = "redis_py.handshake"
# sources whose upstream rate a saver sets when it is on: (saver, what still goes upstream)
SAVER_GOVERNED = {
    "celery.broker_polling": ("poll", "one held BRPOP per --saver-hold (300 s)"),
    "generic.blocking_poll": ("poll", "one held pop per --saver-hold (300 s)"),
    "celery.heartbeat": ("events", "one PUBLISH per --saver-recheck (60 s), or every one while someone "
                                   "else listens"),
    "kombu.binding_sweep": ("sweeps", "one sweep per --saver-sweep-every (600 s)"),
    "kombu.subclient_health": ("ping", "a PING when the upstream has said nothing for 30 s"),
    "redis_py.health_check": ("ping", "a PING when the upstream has said nothing for 30 s"),
    "redis_py.pubsub_health": ("ping", "a PING when the upstream has said nothing for 30 s"),
    "generic.ping": ("ping", "a PING when the upstream has said nothing for 30 s"),
    "redis_py.handshake": ("handshake", "CLIENT SETINFO once per distinct argument list"),
}


def _rates(count: int, span: float) -> dict[str, float]:
    """A count over ``span`` seconds as the report's per_minute, per_hour and per_day."""
    per_s = count / span
    return {"per_minute": round(per_s * 60, 2), "per_hour": round(per_s * 3600, 1), "per_day": round(per_s * DAY)}


def build_report(
    traffic: dict[str, Any],
    usage: dict[str, Any] | None,
    *,
    sources: list[Source] | None = None,
    evidence: list[Evidence] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The report as a dict (the documented ``--json`` output)."""
    sources = sources if sources is not None else load_sources()
    evidence = evidence if evidence is not None else load_evidence()
    now = time.time() if now is None else now
    span = max(1.0, float(traffic.get("measured_seconds") or 1.0))
    rows_in = traffic.get("rows", [])
    total = sum(r["count"] for r in rows_in) or 0
    ids = classify(rows_in, sources, evidence)
    seen = evidence_by_client(rows_in, evidence)
    rows = []
    for r, sid in zip(rows_in, ids):
        rows.append(
            {
                "client": r["client"],
                "command": r["command"],
                "pattern": r["pattern"],
                "count": r["count"],
                **_rates(r["count"], span),
                "share": round(r["count"] / total, 4) if total else 0.0,
                "source": sid,
                **({"instance": r["instance"]} if "instance" in r else {}),
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
    savers_on = set(traffic.get("savers") or ())
    for sid, f in sorted(found.items(), key=lambda kv: -kv[1]["count"]):
        s = by_id[sid]
        per_day = f["count"] / span * DAY
        # blocking pops show their timeout (" timeout=N"): the current period, and words for the name
        timeouts = sorted({t for t in (_timeout(r["pattern"]) for r in f["rows"]) if t})
        timeout = _seconds(timeouts) if timeouts else "?"
        knobs = []
        for k in s.knobs:
            if k.keep is not None:
                keep = k.keep
            elif k.interval:
                # the current period: BRPOP's own timeout when the pattern shows it, else the default
                current = (max(timeouts) if timeouts else None) or s.period or k.interval
                keep = min(1.0, current / k.interval)
            else:
                keep = 1.0
            knobs.append(
                {
                    "setting": k.setting,
                    "effect": k.effect.replace("{timeout}", timeout),
                    "saving_per_day": round(per_day * (1 - keep)),
                    "saving_per_month": round(per_day * (1 - keep) * 30),
                }
            )
        entry = {
            "id": sid,
            "name": s.name.replace("{timeout}", timeout),
            "software": s.software,
            "description": s.description.replace("{timeout}", timeout),
            "count": f["count"],
            "share": round(f["count"] / total, 4) if total else 0.0,
            "per_day": round(per_day),
            "commands": sorted({r["command"] for r in f["rows"]}),
            "clients": sorted({r["client"] for r in f["rows"]}),
            **({"instances": sorted({r["instance"] for r in f["rows"]})} if "instances" in traffic else {}),
            "knobs": knobs,
            "notes": list(s.notes),
        }
        governed = SAVER_GOVERNED.get(sid)
        if sid == POOL_GOVERNED and traffic.get("upstream_pool"):
            # the pool answers these already: its knob would save nothing more
            entry["knobs"] = [k for k in knobs if "--upstream-pool" not in k["setting"]]
            entry["notes"].insert(0, f"the upstream pool (--upstream-pool {traffic['upstream_pool']}) answers the "
                                     "handshake of clients on it; what still goes upstream is each shared "
                                     "connection's own, once, and that of clients that left the pool")
        if governed is not None and governed[0] in savers_on:
            # what reaches the upstream from this source is set by the saver, not by the client's
            # settings: their savings would be wrong
            entry["knobs"] = []
            entry["notes"].insert(0, f"the {governed[0]} saver already answers these in the proxy; what still "
                                     f"goes upstream is {governed[1]}, whatever the client's settings")
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
            daily_resets_at=daily["resets_at"],
            monthly_resets_at=monthly["resets_at"],
        )
        for key, used, cap, win in (
            ("daily_cap_hit_at", daily["used"], daily["cap"], daily),
            ("monthly_cap_hit_at", monthly["used"], monthly["cap"], monthly),
            ("upstash_free_hit_at", monthly["used"], UPSTASH_FREE_MONTHLY, monthly),
        ):
            totals[key] = _hit_at(used, cap, per_day_total, now, win)
    requested = traffic.get("window_seconds")
    window: dict[str, Any] = {
        "requested_seconds": requested,
        "measured_seconds": round(span, 1),
        "from": traffic.get("from", "live"),
        # what the daily figures multiply: a short span means a burst counts as if it went on all day
        "day_multiplier": round(DAY / span, 1),
        "covers_requested": None if not requested else span >= float(requested) - 1.0,
        "start": _iso(traffic.get("measured_from")),
        "end": _iso(traffic.get("measured_until")),
    }
    if "instances" in traffic:
        window["instances"] = traffic["instances"]
    shown = [
        {"client": client, "software": e.name, "seen": found_seen[e.id]}
        for client, found_seen in sorted(seen.items())
        for e in evidence
        if e.id in found_seen
    ]
    celery = any(CELERY in found_seen for found_seen in seen.values())
    report = {
        "version": REPORT_VERSION,
        "generated_at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(),
        "window": window,
        "totals": totals,
        "sources": out_sources,
        "unrecognised": {"count": unrec_count, "share": round(unrec_count / total, 4) if total else 0.0},
        "rows": rows,
        "evidence": shown,
        "ineffective_settings": INEFFECTIVE if celery else [],
        "saved": _saved_section(traffic, span, per_day_total, out_sources),
    }
    return report


# what Celery sends that ``--savers celery`` answers in part (the hint when no saver is on), in words
SAVER_HINT_SOURCES = {"celery.broker_polling": "queue polling", "celery.heartbeat": "heartbeats"}


def _saved_section(traffic: dict[str, Any], span: float, upstream_per_day: float,
                   sources: list[dict[str, Any]]) -> dict[str, Any]:
    """What savers answered instead of the upstream over the window (the rest of the report is
    what is left: what still goes upstream), and a hint when none is on but Celery's polling or
    heartbeats are there."""
    rows_in = traffic.get("saved") or []
    saved_span = max(1.0, float(traffic.get("saved_measured_seconds") or span))
    savers = traffic.get("savers")
    rows = []
    by_saver: dict[str, dict[str, Any]] = {}
    for r in rows_in:
        rows.append({"client": r["client"], "command": r["command"], "saver": r["saver"], "count": r["count"],
                     **_rates(r["count"], saved_span)})
        b = by_saver.setdefault(r["saver"], {"saver": r["saver"], "count": 0, "commands": set(), "clients": set()})
        b["count"] += r["count"]
        b["commands"].add(r["command"])
        b["clients"].add(r["client"])
    rows.sort(key=lambda r: (-by_saver[r["saver"]]["count"], r["saver"], -r["count"], r["command"], r["client"]))
    savers_out = []
    for b in sorted(by_saver.values(), key=lambda b: (-b["count"], b["saver"])):
        savers_out.append({"saver": b["saver"], "count": b["count"], "per_day": round(b["count"] / saved_span * DAY),
                           "commands": sorted(b["commands"]), "clients": sorted(b["clients"])})
    total = sum(r["count"] for r in rows)
    per_day = total / saved_span * DAY
    # of what clients would have sent upstream without the savers, the part they answered
    would_be = per_day + upstream_per_day
    hint = None
    if not total and not savers:
        seen = [s for s in sources if s["id"] in SAVER_HINT_SOURCES]
        if seen:
            what = " and ".join(SAVER_HINT_SOURCES[s["id"]] for s in seen)
            hint = (f"respmeter run --savers celery lets the proxy answer part of Celery's {what} "
                    f"({sum(s['per_day'] for s in seen):,}/day here) itself, without sending it upstream.")
    return {
        "savers": savers,
        "measured_seconds": round(saved_span, 1),
        "count": total,
        "per_minute": round(total / saved_span * 60, 2),
        "per_hour": round(total / saved_span * 3600, 1),
        "per_day": round(per_day),
        "per_month": round(per_day * 30),
        "share": round(per_day / would_be, 4) if would_be else 0.0,
        "by_saver": savers_out,
        "rows": rows,
        "hint": hint,
    }


CELERY = "celery"  # the [[evidence]] whose clients get the Celery advice (ineffective settings)

INEFFECTIVE = [
    {"setting": "broker_heartbeat", "fact": "AMQP only: it sends nothing and saves nothing on Redis."},
    {"setting": "broker_transport_options['max_sleep_time']", "fact": "no effect on the Redis transport's traffic."},
    {"setting": "broker_transport_options['heartbeat']", "fact": "no effect on Redis traffic."},
]


def _left(window: dict[str, Any], now: float) -> float:
    end = dt.datetime.fromisoformat(window["resets_at"]).timestamp()
    return max(0.0, end - now)


def _hit_at(used: int, cap: int | None, per_day: float, now: float, window: dict[str, Any]) -> str | None:
    """When the cap is reached at the current rate (None: no cap, or not before the window resets;
    ``now`` when it is already reached)."""
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


def live_traffic(stats: Any, limits: Any, window: float, savers: Any = None, pool: int = 0) -> dict[str, Any]:
    """The traffic table of a running proxy over the last ``window`` seconds, and what its savers
    answered over it (``savers``: the names of the savers on, when the caller knows them; ``pool``:
    its --upstream-pool)."""
    tracker = stats.patterns
    rows = []
    span = 0.0
    end = time.time()
    if tracker is not None:
        counts, span = tracker.window(window)
        end = tracker.measured_until()
        for (client, cmd, pat), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append({"client": client, "command": cmd, "pattern": pat, "count": n})
    saved, saved_span = _saved_rows(stats, window)
    # measured_seconds is the span the counts cover (see PatternTracker.window), to 1 ms: the rates
    # divide by it; measured_from / measured_until say which span it is (unix time). The saved rows
    # (commands savers answered, never sent upstream) cover saved_measured_seconds, the same span
    # when key patterns are tracked.
    return {"window_seconds": window, "measured_seconds": round(span, 3), "rows": rows, "from": "live",
            "tracking": tracker is not None, "measured_from": round(end - span, 3), "measured_until": round(end, 3),
            "saved": saved, "saved_measured_seconds": round(saved_span, 3),
            "savers": sorted(savers) if savers is not None else None, "upstream_pool": pool}


def _saved_rows(stats: Any, window: float) -> tuple[list[dict[str, Any]], float]:
    from .savedcounts import saved_window

    sw = saved_window(stats)
    if sw is None:
        return [], 0.0
    counts, span = sw.window(window)
    rows = [{"client": client, "command": cmd, "saver": saver, "count": n}
            for (client, cmd, saver), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return rows, span


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
    saved = []
    for client, cmd, saver, n, f, la in (store.saved(win) if hasattr(store, "saved") else ()):
        saved.append({"client": client, "command": cmd, "saver": saver, "count": n})
        first = f if first is None else min(first, f)
        last = la if last is None else max(last, la)
    saved.sort(key=lambda r: (-r["count"], r["client"], r["command"], r["saver"]))
    # the time the proxy ran today (not just from the first to the last command seen): idle time
    # counts, or a short burst would be projected as if it went on all day
    day_start = limits.bounds["daily"][0]
    for a, b in store.alive_spans():
        if b >= day_start and first is not None:
            first = min(first, max(a, day_start))
            last = max(last, b)
    span = (last - first) if first is not None and last is not None else 0.0
    # savers on: not known for a stopped proxy (None)
    return {"window_seconds": None, "measured_seconds": round(max(span, 1.0), 1), "rows": rows, "from": "state",
            "measured_from": first, "measured_until": last, "saved": saved,
            "saved_measured_seconds": round(max(span, 1.0), 1), "savers": None}


def fleet_traffic(store: Any, limits: Any) -> dict[str, Any]:
    """The traffic table of the whole fleet sharing a state store (--state-url): today's counts of
    every instance, each row naming its instance, over the time the instances ran today."""
    win = limits.win_ids["daily"]
    data = store.fleet_traffic(win)
    rows = [{"client": c, "command": cmd, "pattern": pat, "count": n, "instance": inst}
            for inst, c, cmd, pat, n, _, _ in data["patterns"]]
    rows.sort(key=lambda r: (-r["count"], r["client"], r["command"], r["pattern"], r["instance"]))
    saved = [{"client": c, "command": cmd, "saver": sv, "count": n, "instance": inst}
             for inst, c, cmd, sv, n, _, _ in data["saved"]]
    saved.sort(key=lambda r: (-r["count"], r["client"], r["command"], r["saver"], r["instance"]))
    day_start = limits.bounds["daily"][0]
    spans = {inst: (max(a, day_start), b) for inst, (a, b) in data["alive"].items() if b >= day_start}
    # the time the fleet ran today (idle time counts, as in stored_traffic), and what was seen in it
    times = [t for span in spans.values() for t in span]
    times += [t for *_, f, la in data["patterns"] + data["saved"] for t in (max(f, day_start), la)]
    first, last = min(times, default=None), max(times, default=None)
    span = (last - first) if first is not None and last is not None else 0.0
    instances = {inst: {"first_seen": _iso(a), "last_push": _iso(b),
                        "commands": sum(r["count"] for r in rows if r["instance"] == inst)}
                 for inst, (a, b) in sorted(spans.items())}
    return {"window_seconds": None, "measured_seconds": round(max(span, 1.0), 1), "rows": rows, "from": "fleet",
            "measured_from": first, "measured_until": last, "saved": saved,
            "saved_measured_seconds": round(max(span, 1.0), 1), "savers": None, "instances": instances}
