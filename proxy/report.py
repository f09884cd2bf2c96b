"""Human-readable output for ``respmeter usage`` (and ``respmeter report``)."""

from __future__ import annotations

from typing import Any


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
            for client, c in sorted(w["clients"].items(), key=lambda kv: -kv[1]["used"]):
                extra = f" of {_n(c['cap'])} ({_n(c['remaining'])} left)" if c["cap"] else ""
                lines.append(f"    {client:<24} {_n(c['used']):>12}{extra}")
        if w["commands"]:
            lines.append("  by command:")
            for cmd, n in list(w["commands"].items())[:15]:
                lines.append(f"    {cmd:<24} {_n(n):>12}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
