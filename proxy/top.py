"""``respmeter top``: a live terminal view of a running proxy (stdlib curses, works over SSH).

Each refresh scrapes the admin endpoint's /metrics and /api/usage; rates are the difference between
two scrapes. ``q`` or Ctrl-C quits. ``--once`` prints one frame as plain text (for scripts and tests);
without a terminal it prints a frame every interval as plain text.
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .config import parse_hostport


def scrape(admin: str) -> dict[str, Any]:
    host, port = parse_hostport(admin, "--admin")
    base = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    from .admin import client_headers

    headers = client_headers()  # RESPMETER_ADMIN_TOKEN(_FILE), when the endpoint wants a token
    with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=headers), timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    snap: dict[str, Any] = {"t": time.monotonic(), "by_command": {}, "by_client": {}, "outcomes": {}, "throttled": {},
                            "saved": {}, "up": None}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "respmeter_upstream_commands_total":
                snap["by_command"][s.labels["command"]] = snap["by_command"].get(s.labels["command"], 0) + s.value
                snap["by_client"][s.labels["client"]] = snap["by_client"].get(s.labels["client"], 0) + s.value
            elif s.name == "respmeter_commands_total":
                o = s.labels["outcome"]
                snap["outcomes"][o] = snap["outcomes"].get(o, 0) + s.value
            elif s.name == "respmeter_saved_commands_total":
                k = s.labels["saver"]
                snap["saved"][k] = snap["saved"].get(k, 0) + s.value
            elif s.name == "respmeter_throttled_total":
                k = f"{s.labels['rule']}/{s.labels['action']}"
                snap["throttled"][k] = s.value
            elif s.name == "respmeter_upstream_up":
                snap["up"] = s.value
            elif s.name == "respmeter_client_connections":
                snap["connections"] = s.value
    try:
        import json

        with urllib.request.urlopen(urllib.request.Request(base + "/api/usage", headers=headers), timeout=5) as r:  # noqa: S310
            snap["usage"] = json.load(r)
    except (OSError, ValueError):
        snap["usage"] = None
    return snap


def rates(prev: dict[str, float], cur: dict[str, float], dt: float) -> list[tuple[str, float, float]]:
    out = [(k, (v - prev.get(k, 0)) / dt if dt > 0 else 0.0, v) for k, v in cur.items()]
    out.sort(key=lambda x: (-x[1], -x[2]))
    return out


def bar(used: float, cap: float | None, width: int) -> str:
    if not cap:
        return "(no cap)"
    frac = min(1.0, used / cap)
    n = int(frac * width)
    return "[" + "#" * n + "." * (width - n) + f"] {100 * used / cap:5.1f}%"


def frame(prev: dict[str, Any], cur: dict[str, Any], width: int = 100, height: int = 40) -> list[str]:
    dt = max(1e-6, cur["t"] - prev["t"])
    lines = []
    total_rate = sum(r for _, r, _ in rates(prev["by_command"], cur["by_command"], dt))
    up = {1.0: "up", 0.0: "DOWN"}.get(cur["up"], "?")
    lines.append(f"respmeter top   upstream {up}   connections {int(cur.get('connections', 0))}   "
                 f"{total_rate:,.1f} upstream commands/s   (q quits)")
    u = cur.get("usage")
    if u:
        for window, title in (("daily", "today"), ("monthly", "month")):
            w = u["windows"][window]
            lines.append(f"{title:>6}: {w['used']:>12,} used  {bar(w['used'], w['cap'], max(10, width - 60))}"
                         + (f"  cap {w['cap']:,}" if w["cap"] else ""))
    o = cur["outcomes"]
    po = prev["outcomes"]
    lines.append(
        "outcomes/s: " + "  ".join(f"{k} {(o.get(k, 0) - po.get(k, 0)) / dt:,.1f}" for k in ("ok", "error", "rejected", "local"))
        + f"   rejected total {int(o.get('rejected', 0)):,}"
    )
    saved = cur.get("saved") or {}
    if saved:
        ps = prev.get("saved") or {}
        lines.append("saved/s (never sent upstream): " + "  ".join(
            f"{k} {(v - ps.get(k, 0)) / dt:,.1f}" for k, v in sorted(saved.items()))
            + f"   saved total {int(sum(saved.values())):,}")
    if cur["throttled"]:
        lines.append("throttled: " + "  ".join(f"{k} {int(v):,}" for k, v in sorted(cur["throttled"].items())))
    lines.append("")
    half = max(20, (height - len(lines) - 3) // 2)
    lines.append(f"{'COMMAND':<28}{'/s':>10}{'total':>14}")
    for name, r, v in rates(prev["by_command"], cur["by_command"], dt)[:half]:
        lines.append(f"{name[:27]:<28}{r:>10,.1f}{int(v):>14,}")
    lines.append("")
    lines.append(f"{'CLIENT':<28}{'/s':>10}{'total':>14}")
    for name, r, v in rates(prev["by_client"], cur["by_client"], dt)[: max(5, height - len(lines) - 1)]:
        lines.append(f"{name[:27]:<28}{r:>10,.1f}{int(v):>14,}")
    return [ln[:width] for ln in lines[:height]]


def _plain(ns: argparse.Namespace, prev: dict[str, Any]) -> int:
    """Without a terminal (piped, in a script or a service), or with --once: frames as plain text,
    one every interval, a blank line between them (like ``top -b``); --once prints one."""
    import os
    import sys

    from .admin import unreachable

    try:
        while True:
            time.sleep(ns.interval)
            try:
                cur = scrape(ns.admin)
            except OSError as exc:
                print(f"respmeter: {unreachable(ns.admin, exc)}", file=sys.stderr, flush=True)
                if ns.once:
                    return 1
                continue
            print("\n".join(frame(prev, cur)), flush=True)
            if ns.once:
                return 0
            print(flush=True)
            prev = cur
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # (piped into head, say): the reader is gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def top_command(ns: argparse.Namespace) -> int:
    import sys

    try:
        prev = scrape(ns.admin)
    except OSError as exc:
        from .admin import unreachable

        print(f"respmeter: {unreachable(ns.admin, exc)}", file=sys.stderr)
        return 1
    if ns.once or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _plain(ns, prev)
    import curses

    def loop(stdscr: Any) -> None:
        nonlocal prev
        curses.curs_set(0)
        stdscr.timeout(int(ns.interval * 1000))
        cur = prev
        error = ""
        while True:
            key = stdscr.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            try:
                new = scrape(ns.admin)
                prev, cur = cur, new
                error = ""
            except OSError as exc:
                error = f"admin endpoint unreachable: {exc}"
            h, w = stdscr.getmaxyx()
            stdscr.erase()
            lines = frame(prev, cur, w - 1, h - 1) if cur is not prev else ["waiting for a second sample…"]
            if error:
                lines = [error[: w - 1]] + lines
            for i, line in enumerate(lines[: h - 1]):
                stdscr.addnstr(i, 0, line, w - 1)
            stdscr.refresh()

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
    return 0
