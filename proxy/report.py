"""Human-readable output for ``respmeter usage`` (and ``respmeter report``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

DAY = 86400.0


def _n(v: Any) -> str:
    return "-" if v is None else f"{v:,}"


def bar(used: int, cap: int | None, width: int = 30) -> str:
    if not cap:
        return ""
    frac = min(1.0, used / cap)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + f"] {100 * used / cap:5.1f}%"


def format_usage(snap: dict[str, Any]) -> str:
    lines = [f"respmeter usage at {snap['generated_at']} ({snap['timezone']})", ""]
    for window in ("daily", "monthly"):
        w = snap["windows"][window]
        title = "Today" if window == "daily" else "This month"
        lines.append(f"{title} ({w['id']}, resets {w['resets_at']})")
        cap = w["cap"]
        lines.append(
            f"  used {_n(w['used'])}"
            + (f" of {_n(cap)} cap, {_n(w['remaining'])} left  {bar(w['used'], cap)}" if cap else " (no cap)")
        )
        proj = f"  projected at window end: {_n(w['projected'])}"
        if w.get("projected_exceeds_cap"):
            proj += "  ** over the cap at this rate **"
        lines.append(proj)
        if w["clients"]:
            lines.append("  by client:")
            width = max([24, *(len(k) for k in w["clients"])])  # (the numbers stay in one column)
            for client, c in sorted(w["clients"].items(), key=lambda kv: -kv[1]["used"]):
                extra = f" of {_n(c['cap'])} ({_n(c['remaining'])} left)" if c["cap"] else ""
                lines.append(f"    {client:<{width}} {_n(c['used']):>12}{extra}")
        if w["commands"]:
            lines.append("  by command:")
            shown = list(w["commands"].items())[:15]
            width = max([24, *(len(k) for k, _ in shown)])
            for cmd, n in shown:
                lines.append(f"    {cmd:<{width}} {_n(n):>12}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _rate(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:,.1f}"
    return f"{v:.2f}"


def when(iso: str) -> str:
    """'2026-12-08T00:50:08.043209+00:00' -> '8 Dec 00:50 UTC'."""
    t = dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc)
    return f"{t.day} {t:%b %H:%M} UTC"


def _cap_line(title: str, used: int, cap: int | None, hit: str | None, resets: str | None) -> str:
    if not cap:
        return f"{title}: {used:,} used (no cap)"
    line = f"{title}: {used:,} used of {cap:,} cap"
    if used >= cap:
        return line + "; reached" + (f", until it resets on {when(resets)}" if resets else "")
    if hit:
        return line + f"; at this rate, reached on {when(hit)}"
    return line + "; at this rate, not reached" + (f" before it resets on {when(resets)}" if resets else "")


def format_report(rep: dict[str, Any], limit: int = 25) -> str:
    """The traffic breakdown a user can act on (``respmeter report``)."""
    t = rep["totals"]
    w = rep["window"]
    if w["from"] == "live":
        src = "live, last " + _dur(w["requested_seconds"])
    elif w["from"] == "fleet":
        n = len(w.get("instances") or {})
        src = f"fleet of {n} instance{'s' if n != 1 else ''} sharing the state store, today"
    else:
        src = "state directory, today"
    fleet = w["from"] == "fleet"
    # one projection: the measured rate carried to a day and a month; the caps say when that rate reaches them
    lines = [
        f"respmeter report ({src}; measured over {_dur(w['measured_seconds'])})",
        "",
        f"Total: {_rate(t['per_minute'])}/min, {_rate(t['per_hour'])}/hour; at this rate {t['per_day']:,}/day, "
        f"~{t['per_month']:,}/month",
    ]
    measured = float(w["measured_seconds"])
    notes = []
    if measured < 3600 and t["commands"]:
        notes.append(f"Projected from only {_dur(measured)} of traffic (x{DAY / measured:,.0f} for a day): a burst "
                     "or a start-up in it counts as if it went on all day.")
    if w.get("covers_requested") is False:
        notes.append(f"The proxy has counted for {_dur(measured)} of the {_dur(w['requested_seconds'])} asked for.")
    if notes:
        lines.append(" ".join(notes))
    if "used_today" in t:
        lines.append(_cap_line("Today", t["used_today"], t.get("daily_cap"), t.get("daily_cap_hit_at"),
                               t.get("daily_resets_at")))
        lines.append(_cap_line("This month", t["used_month"], t.get("monthly_cap"), t.get("monthly_cap_hit_at"),
                               t.get("monthly_resets_at")))
    free = t["upstash_free_monthly"]
    hit = t.get("upstash_free_hit_at")
    if hit and t.get("used_month", 0) >= free:
        hit_text = "; this month's use is past it"
    elif hit:
        hit_text = f"; at this rate, this month's use reaches it on {when(hit)}"
    else:
        hit_text = ""
    lines.append(f"Upstash free tier ({free:,}/month): this rate uses {100 * t['upstash_free_share']:.0f}% of it"
                 + hit_text)
    lines.append("")
    lines += format_saved(rep.get("saved"), limit)
    if rep["sources"]:
        lines.append("Where it comes from:")
        for s in rep["sources"]:
            est = f"  (~{s['instances_estimate']} instance(s))" if s.get("instances_estimate") else ""
            lines.append(f"  {100 * s['share']:5.1f}%  {s['per_day']:>10,}/day  {s['name']}{est}")
            if s.get("instances"):
                lines.append(f"  {'':>6}  {'':>14}from {', '.join(s['instances'])}")
        if rep["unrecognised"]["count"]:
            u = rep["unrecognised"]
            lines.append(f"  {100 * u['share']:5.1f}%  {'':>10}      unrecognised (see the table)")
        for e in rep.get("evidence", []):
            lines.append(f"  {e['software']} recognised for client {e['client']}: seen {', '.join(e['seen'])}")
        lines.append("")
        lines.append("What cuts it:")
        for s in rep["sources"]:
            if not s["knobs"] and not s["notes"]:
                continue
            lines.append(f"  {s['name']} ({s['per_day']:,}/day):")
            lines.append(f"    why: {s['description']}")
            for k in s["knobs"]:
                lines.append(f"    - {k['setting']}")
                lines.append(f"        {k['effect']}; saves ~{k['saving_per_day']:,}/day (~{k['saving_per_month']:,}/month)")
            for n in s["notes"]:
                lines.append(f"    note: {n}")
        lines.append("")
    hint = (rep.get("saved") or {}).get("hint")
    if hint:
        lines.append(f"Hint: {hint}")
        lines.append("")
    if rep.get("ineffective_settings"):
        lines.append("Settings that do nothing for Redis traffic:")
        for x in rep["ineffective_settings"]:
            lines.append(f"  - {x['setting']}: {x['fact']}")
        lines.append("")
    if fleet:
        lines.append("Instances:")
        for inst, i in (w.get("instances") or {}).items():
            lines.append(f"  {inst}: {i['commands']:,} commands today (last pushed {when(i['last_push'])})")
        lines.append("")
    inst_head = f" {'instance':<16}" if fleet else ""
    # the command column fits the longest name shown (client|maint_notifications is 27)
    cw = max([16, *(len(r["command"]) for r in rep["rows"][:limit])])
    lines.append(f"{'share':>6} {'/min':>8} {'/hour':>9} {'/day':>10}  {'command':<{cw}} {'key pattern':<40} "
                 f"{'client':<12}{inst_head} source")
    for r in rep["rows"][:limit]:
        pat = r["pattern"] if len(r["pattern"]) <= 40 else r["pattern"][:39] + "…"
        inst = f" {r.get('instance', '')[:16]:<16}" if fleet else ""
        lines.append(
            f"{100 * r['share']:5.1f}% {_rate(r['per_minute']):>8} {_rate(r['per_hour']):>9} {r['per_day']:>10,}  "
            f"{r['command']:<{cw}} {pat:<40} {r['client'][:12]:<12}{inst} {r['source'] or 'UNRECOGNISED'}"
        )
    if len(rep["rows"]) > limit:
        lines.append(f"... {len(rep['rows']) - limit} more rows (--rows N, or --json)")
    return "\n".join(lines) + "\n"


def format_saved(saved: dict[str, Any] | None, limit: int = 25) -> list[str]:
    """The saved section: what savers answered in the proxy over the window (nothing at all when no
    saver is on and nothing was saved; one line when savers are on but saved nothing)."""
    if not saved:
        return []
    on = saved.get("savers")
    over = _dur(saved["measured_seconds"])
    if not saved["count"]:
        return [f"Savers on ({', '.join(on)}): nothing saved over {over}.", ""] if on else []
    lines = [
        "Saved by the proxy" + (f" (savers on: {', '.join(on)})" if on else "")
        + ": answered locally, never sent upstream",
        f"  {saved['count']:,} commands over {over}: at this rate {saved['per_day']:,}/day, "
        f"~{saved['per_month']:,}/month; {100 * saved['share']:.0f}% of what would have gone upstream",
    ]
    clients = len({r["client"] for r in saved["rows"]}) > 1
    lines.append((f"  {'/day':>10} {'count':>9}  {'saver':<10} {'command':<28}" + (" client" if clients else "")).rstrip())
    for r in saved["rows"][:limit]:
        line = f"  {r['per_day']:>10,} {r['count']:>9,}  {r['saver']:<10} {r['command']:<28}"
        lines.append((line + (f" {r['client']}" if clients else "")).rstrip())
    if len(saved["rows"]) > limit:
        lines.append(f"  ... {len(saved['rows']) - limit} more rows (--rows N, or --json)")
    if len(saved["by_saver"]) > 1:
        lines.append("  by saver: " + ", ".join(f"{b['saver']} {b['per_day']:,}/day" for b in saved["by_saver"]))
    lines.append("The totals above and everything below are what is left: the commands that still go upstream.")
    lines.append("")
    return lines


def _dur(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s >= 86400:
        return f"{s / 86400:.1f}d"
    if s >= 3600:
        return f"{s / 3600:.1f}h"
    if s >= 60:
        return f"{s / 60:.1f}m"
    return f"{s:.0f}s"
