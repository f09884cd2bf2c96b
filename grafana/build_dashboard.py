#!/usr/bin/env python3
"""Generate grafana/dashboards/respmeter.json, the respmeter Grafana dashboard.

The committed JSON is what Grafana imports (provisioning, or Dashboards > New > Import); this
script is how it is written. Edit the panels here, then run::

    python grafana/build_dashboard.py          # rewrite the JSON
    python grafana/build_dashboard.py --check  # exit 1 if the committed JSON is stale

tests/test_observability.py runs ``--check`` and evaluates every query below against a real
Prometheus scraping real proxies.

Rules the queries follow:

* Every panel and every query uses the ``${datasource}`` variable (no datasource id is hard-coded).
* Counters (respmeter_*_total, histograms) are per process: ``sum`` them across instances.
* ``respmeter_quota_used`` / ``respmeter_quota_limit`` / ``respmeter_quota_reset_timestamp_seconds``
  are each process's view of SHARED state (processes that share a state directory all report the
  same total), so they are combined with ``max``, never ``sum``.
* Projections: used + (recent billable rate, summed over instances) x (seconds until the window
  resets). The recent rate is taken over 1h for the daily window and 1d for the monthly window
  (the alert rules in deploy/respmeter-alerts.yml use the same windows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "respmeter.json"

UID = "respmeter-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}

# label matchers every query starts with
SEL = 'job=~"$job",instance=~"$instance"'
# ... plus the client/command variables where the metric has those labels
SEL_CC = SEL + ',client=~"$client",command=~"$command"'

DAILY_RATE_WINDOW = "1h"
MONTHLY_RATE_WINDOW = "1d"


def used(window: str, client: str = "all") -> str:
    return f'max(respmeter_quota_used{{{SEL},window="{window}",client="{client}"}})'


def limit(window: str, client: str = "all") -> str:
    return f'max(respmeter_quota_limit{{{SEL},window="{window}",client="{client}"}})'


def seconds_left(window: str) -> str:
    return f'clamp_min(max(respmeter_quota_reset_timestamp_seconds{{{SEL},window="{window}"}}) - time(), 0)'


def projected(window: str) -> str:
    rw = DAILY_RATE_WINDOW if window == "daily" else MONTHLY_RATE_WINDOW
    rate = f"(sum(rate(respmeter_upstream_commands_total{{{SEL}}}[{rw}])) or vector(0))"
    return f"{used(window)} + {rate} * {seconds_left(window)}"


# --------------------------------------------------------------------------------------------
# panel helpers
# --------------------------------------------------------------------------------------------


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def target(ref: str, expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict:
    t = {
        "refId": ref,
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }
    if table:
        t["format"] = "table"
    return t


def thresholds(*steps: tuple[str, float | None]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


GREEN_ORANGE_RED = thresholds(("green", None), ("orange", 80), ("red", 100))
NEUTRAL = thresholds(("text", None))


def base(pid: int, kind: str, title: str, desc: str, pos: tuple[int, int, int, int], targets: list[dict]) -> dict:
    x, y, w, h = pos
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
    }


def row(pid: int, title: str, y: int) -> dict:
    return {
        "id": pid,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def gauge(pid, title, desc, pos, targets, *, unit="percent", steps=GREEN_ORANGE_RED, max_=100) -> dict:
    p = base(pid, "gauge", title, desc, pos, targets)
    p["fieldConfig"] = {
        "defaults": {"unit": unit, "min": 0, "max": max_, "decimals": 1, "thresholds": steps,
                     "color": {"mode": "thresholds"}},
        "overrides": [],
    }
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
        "showThresholdLabels": False,
        "showThresholdMarkers": True,
    }
    return p


def stat(pid, title, desc, pos, targets, *, unit="short", steps=NEUTRAL, mappings=None, color_mode="value",
         decimals=None) -> dict:
    p = base(pid, "stat", title, desc, pos, targets)
    defaults: dict = {"unit": unit, "thresholds": steps, "color": {"mode": "thresholds"},
                      "mappings": mappings or []}
    if decimals is not None:
        defaults["decimals"] = decimals
    p["fieldConfig"] = {"defaults": defaults, "overrides": []}
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
        "textMode": "value_and_name",
        "colorMode": color_mode,
        "graphMode": "none",
        "justifyMode": "auto",
    }
    return p


def bargauge(pid, title, desc, pos, targets) -> dict:
    p = base(pid, "bargauge", title, desc, pos, targets)
    p["fieldConfig"] = {
        "defaults": {"unit": "percent", "min": 0, "max": 100, "decimals": 1, "thresholds": GREEN_ORANGE_RED,
                     "color": {"mode": "thresholds"}},
        "overrides": [],
    }
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "horizontal",
        "displayMode": "gradient",
        "showUnfilled": True,
    }
    return p


def timeseries(pid, title, desc, pos, targets, *, unit="ops", stacked=False, fill=10) -> dict:
    p = base(pid, "timeseries", title, desc, pos, targets)
    p["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "min": 0,
            "color": {"mode": "palette-classic"},
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 30 if stacked else fill,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
            },
        },
        "overrides": [],
    }
    p["options"] = {
        "legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"], "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def table(pid, title, desc, pos, targets, *, value_name: str) -> dict:
    p = base(pid, "table", title, desc, pos, targets)
    p["fieldConfig"] = {"defaults": {"unit": "short", "decimals": 0}, "overrides": []}
    p["options"] = {"showHeader": True, "sortBy": [{"displayName": value_name, "desc": True}]}
    p["transformations"] = [
        {"id": "organize", "options": {"excludeByName": {"Time": True},
                                       "renameByName": {"Value": value_name}}},
    ]
    return p


# --------------------------------------------------------------------------------------------
# the dashboard
# --------------------------------------------------------------------------------------------


def panels() -> list[dict]:
    nid = Ids()
    ps: list[dict] = []
    rate = "$__rate_interval"

    # -- budget ---------------------------------------------------------------------------------
    ps.append(row(nid(), "Budget: billable commands against the caps", 0))
    for x, window, word in ((0, "daily", "Today"), (12, "monthly", "This month")):
        reset = "at midnight" if window == "daily" else "on the 1st"
        rw = DAILY_RATE_WINDOW if window == "daily" else MONTHLY_RATE_WINDOW
        ps.append(gauge(
            nid(), f"{word}: % of the {window} cap",
            f"Billable (upstream) commands used in the current {window} window as a percentage of "
            f"--{window}-cap (used), and where the last {rw}'s rate leads by the time the window resets "
            f"{reset} in --cap-timezone (projected). Orange from 80%, red at 100%: at the cap the "
            "proxy refuses further commands. Empty when no cap is configured.",
            (x, 1, 6, 7),
            [
                target("A", f"100 * {used(window)} / {limit(window)}", "used"),
                target("B", f"100 * ({projected(window)}) / {limit(window)}", "projected at reset"),
            ],
            max_=100,
        ))
        ps.append(stat(
            nid(), f"{word}: billable commands",
            f"Used: billable commands counted in the current {window} window (shared state: the max over "
            f"instances, not the sum). Cap: --{window}-cap. Projected: used plus the last {rw}'s rate "
            "(summed over instances) times the time left in the window.",
            (x + 6, 1, 6, 7),
            [
                target("A", used(window), "used"),
                target("B", limit(window), "cap"),
                target("C", projected(window), "projected at reset"),
            ],
        ))

    ps.append(stat(
        nid(), "Windows reset in",
        "Time until the daily and the monthly windows start again (midnight and the 1st of the month in "
        "--cap-timezone).",
        (0, 8, 4, 5),
        [
            target("A", f'max(respmeter_quota_reset_timestamp_seconds{{{SEL},window="daily"}}) - time()', "daily"),
            target("B", f'max(respmeter_quota_reset_timestamp_seconds{{{SEL},window="monthly"}}) - time()',
                   "monthly"),
        ],
        unit="s",
    ))
    ps.append(stat(
        nid(), "Upstream reachable",
        "respmeter_upstream_up per proxy instance: UP when the latest evidence (connects, replies, "
        "the /healthz probe) says the upstream Redis is reachable, DOWN after a failure; and "
        "respmeter_healthy: what /healthz answers (DOWN also while credentials are rejected or the "
        "provider's request quota is exceeded).",
        (4, 8, 4, 5),
        [target("A", f"min by (instance) (respmeter_upstream_up{{{SEL}}})", "{{instance}} upstream"),
         target("B", f"min by (instance) (respmeter_healthy{{{SEL}}})", "{{instance}} /healthz")],
        steps=thresholds(("red", None), ("green", 1)),
        mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red", "index": 0},
                                                "1": {"text": "UP", "color": "green", "index": 1}}}],
        color_mode="background",
    ))
    ps.append(bargauge(
        nid(), "Per-client caps (% used)",
        "Clients with their own cap (--client-cap ID:daily=N / ID:monthly=N): the share of it used in the "
        "current window. Empty when no per-client cap is configured.",
        (8, 8, 8, 5),
        [target(
            "A",
            f'100 * max by (client, window) (respmeter_quota_used{{{SEL},client!="all",client=~"$client"}})'
            f' / max by (client, window) (respmeter_quota_limit{{{SEL},client!="all",client=~"$client"}})',
            "{{client}} {{window}}",
        )],
    ))
    ps.append(stat(
        nid(), "Billable commands/s",
        "Commands forwarded upstream (what the provider bills) per second, all instances together, "
        "including the proxy's own (client=\"respmeter\").",
        (16, 8, 4, 5),
        [target("A", f"sum(rate(respmeter_upstream_commands_total{{{SEL}}}[{rate}]))", "billable/s")],
        unit="ops", decimals=2,
    ))
    ps.append(stat(
        nid(), "Proxy instances",
        "Proxy processes scraped, by respmeter version and hot path (C, or Python when the C "
        "extension is not built: about half the pipelined throughput).",
        (20, 8, 4, 5),
        [target("A", f"count by (version, hot_path) (respmeter_build_info{{{SEL}}})", "v{{version}} {{hot_path}}")],
    ))

    # -- traffic --------------------------------------------------------------------------------
    ps.append(row(nid(), "Traffic", 13))
    ps.append(timeseries(
        nid(), "Commands/s by command",
        "Every command clients sent, whatever happened to it (forwarded, refused or answered by the proxy), "
        "stacked by command.",
        (0, 14, 12, 8),
        [target("A", f"sum by (command) (rate(respmeter_commands_total{{{SEL_CC}}}[{rate}]))", "{{command}}")],
        stacked=True,
    ))
    ps.append(timeseries(
        nid(), "Commands/s by client",
        "Every command clients sent, stacked by client identity (proxy user label, CLIENT SETNAME name, "
        "'anonymous', or 'other' past --client-label-limit).",
        (12, 14, 12, 8),
        [target("A", f"sum by (client) (rate(respmeter_commands_total{{{SEL_CC}}}[{rate}]))", "{{client}}")],
        stacked=True,
    ))
    ps.append(timeseries(
        nid(), "Billable commands/s by client",
        "Commands forwarded to the upstream (the billed count), stacked by client; client 'respmeter' is the "
        "proxy itself.",
        (0, 22, 12, 8),
        [target("A", f"sum by (client) (rate(respmeter_upstream_commands_total{{{SEL_CC}}}[{rate}]))",
                "{{client}}")],
        stacked=True,
    ))
    ps.append(table(
        nid(), "Top billable commands (selected time range)",
        "The 15 commands that cost the most billable (upstream) commands over the dashboard's time range.",
        (12, 22, 12, 8),
        [target("A", f"topk(15, sum by (command) (increase(respmeter_upstream_commands_total{{{SEL_CC}}}"
                     "[$__range])))", "{{command}}", instant=True, table=True)],
        value_name="billable commands",
    ))
    ps.append(timeseries(
        nid(), "Commands/s by outcome",
        "ok: forwarded, normal reply; error: forwarded, the upstream replied with an error; rejected: "
        "refused by the proxy (cap, rate limit, authentication...); local: answered by the proxy itself.",
        (0, 30, 12, 8),
        [target("A", f"sum by (outcome) (rate(respmeter_commands_total{{{SEL_CC}}}[{rate}]))", "{{outcome}}")],
        stacked=True,
    ))
    ps.append(timeseries(
        nid(), "Error replies/s by command",
        "Commands the upstream answered with an error (WRONGTYPE, unknown command, ...), by command.",
        (12, 30, 12, 8),
        [target("A", f'sum by (command) (rate(respmeter_commands_total{{{SEL_CC},outcome="error"}}[{rate}]))',
                "{{command}}")],
    ))

    # -- savers ---------------------------------------------------------------------------------
    ps.append(row(nid(), "Savers: commands the proxy answered instead of the upstream", 38))
    ps.append(timeseries(
        nid(), "Saved commands/s by saver",
        "Commands a saver (--savers: poll, events, ping, handshake, sweeps) answered in the proxy, "
        "so they never reached the upstream and are not billed, stacked by saver. Empty when no saver "
        "is on.",
        (0, 39, 7, 8),
        [target("A", f"sum by (saver) (rate(respmeter_saved_commands_total{{{SEL_CC}}}[{rate}]))", "{{saver}}")],
        stacked=True,
    ))
    ps.append(timeseries(
        nid(), "Saved vs upstream commands/s",
        "saved: answered by the proxy's savers; upstream: still sent to the upstream (the billed count, the "
        "proxy's own commands included). Stacked, the two make what would go upstream without the savers.",
        (7, 39, 7, 8),
        [
            target("A", f"sum(rate(respmeter_saved_commands_total{{{SEL_CC}}}[{rate}]))", "saved"),
            target("B", f"sum(rate(respmeter_upstream_commands_total{{{SEL_CC}}}[{rate}]))", "upstream"),
        ],
        stacked=True,
    ))
    ps.append(table(
        nid(), "Saved commands by saver and command (selected time range)",
        "Commands each saver answered in the proxy over the dashboard's time range, by command.",
        (14, 39, 6, 8),
        [target("A", f"sum by (saver, command) (increase(respmeter_saved_commands_total{{{SEL_CC}}}"
                     "[$__range]))", "{{saver}} {{command}}", instant=True, table=True)],
        value_name="saved commands",
    ))
    ps.append(stat(
        nid(), "Item held in the proxy, longest",
        "poll saver: the longest an item popped upstream stayed in the proxy before it reached a client or "
        "went back to its list, since the proxy started: the window in which a kill -9 of the proxy could "
        "lose it (at most 1 s by design). Empty when the poll saver is off.",
        (20, 39, 4, 8),
        [target("A", f"max(respmeter_saver_item_held_seconds_max{{{SEL}}})", "held")],
        unit="s", decimals=2,
    ))

    # -- rejections and errors ----------------------------------------------------------------
    ps.append(row(nid(), "Rejections and errors", 47))
    ps.append(timeseries(
        nid(), "Rejected and throttled commands/s by reason",
        "Rate limit rules (action=reject refuses, action=delay holds the command) and caps (commands refused "
        "because the daily or monthly cap was reached). 'rejected: <reason>' counts every refused command by "
        "why: cap, rate_limit, rate_limit_queue_full, noauth, auth_failed, upstream_unavailable.",
        (0, 48, 12, 8),
        [
            target("A", f"sum by (rule, action) (rate(respmeter_throttled_total{{{SEL}}}[{rate}]))",
                   "rate limit {{rule}} ({{action}})"),
            target("B", f"sum by (window) (rate(respmeter_cap_rejections_total{{{SEL}}}[{rate}]))",
                   "{{window}} cap"),
            target("C", f"sum by (reason) (rate(respmeter_rejections_total{{{SEL}}}[{rate}]))",
                   "rejected: {{reason}}"),
        ],
    ))
    ps.append(timeseries(
        nid(), "Upstream errors and quota errors /s",
        "Upstream failures by kind (connect_refused, connect_timeout, dns, tls, auth, reset, eof, protocol); "
        "'quota exceeded' counts replies in which the provider said its request quota is used up (Upstash "
        "'max requests limit exceeded'); 'client protocol errors' are client connections closed for "
        "malformed requests.",
        (12, 48, 12, 8),
        [
            target("A", f"sum by (kind) (rate(respmeter_upstream_errors_total{{{SEL}}}[{rate}]))", "{{kind}}"),
            target("B", f"sum(rate(respmeter_upstream_quota_exceeded_total{{{SEL}}}[{rate}]))",
                   "quota exceeded"),
            target("C", f"sum(rate(respmeter_protocol_errors_total{{{SEL}}}[{rate}]))", "client protocol errors"),
        ],
    ))

    # -- latency -------------------------------------------------------------------------------
    ps.append(row(nid(), "Latency (forward to reply, as seen by the proxy)", 56))
    for x, q in ((0, "0.5"), (12, "0.99")):
        name = "p50" if q == "0.5" else "p99"
        ps.append(timeseries(
            nid(), f"Latency {name} by command",
            f"{name} of the round trip from forwarding a command to its reply, by command (blocking commands "
            "and subscriptions are not observed). Buckets from 50us to 10s.",
            (x, 57, 12, 8),
            [target("A", f"histogram_quantile({q}, sum by (le, command) "
                         f"(rate(respmeter_command_duration_seconds_bucket{{{SEL},command=~\"$command\"}}[{rate}])))",
                    "{{command}}")],
            unit="s",
        ))

    # -- connections and bytes ------------------------------------------------------------------
    ps.append(row(nid(), "Connections and bytes", 65))
    ps.append(timeseries(
        nid(), "Open connections",
        "Client connections open now, and upstream connections: each client's own and, with "
        "--upstream-pool N, the N shared per protocol; pinned: pooled clients that left the pool for a "
        "connection of their own (a blocking, pub/sub or transaction command). All proxy instances.",
        (0, 66, 8, 8),
        [
            target("A", f"sum(respmeter_client_connections{{{SEL}}})", "clients"),
            target("B", f"sum(respmeter_upstream_connections{{{SEL}}})", "upstream"),
            target("C", f"sum(respmeter_pinned_clients{{{SEL}}})", "pinned clients"),
        ],
        unit="short",
    ))
    ps.append(timeseries(
        nid(), "New connections and push messages /s",
        "Client connections accepted per second, connections refused (refused max_clients: "
        "--max-clients reached; refused out_of_fds: the proxy ran out of file descriptors), and "
        "out-of-band frames (pub/sub messages, RESP3 pushes, MONITOR lines) passed to clients.",
        (8, 66, 8, 8),
        [
            target("A", f"sum(rate(respmeter_connections_total{{{SEL}}}[{rate}]))", "connections accepted"),
            target("B", f"sum(rate(respmeter_push_messages_total{{{SEL}}}[{rate}]))", "push messages"),
            target("C", f"sum by (reason) (rate(respmeter_refused_connections_total{{{SEL}}}[{rate}]))",
                   "refused {{reason}}"),
        ],
    ))
    ps.append(timeseries(
        nid(), "Bytes/s in and out",
        "from_client / to_client: the clients' side; to_upstream / from_upstream: the Redis side.",
        (16, 66, 8, 8),
        [target("A", f"sum by (direction) (rate(respmeter_bytes_total{{{SEL}}}[{rate}]))", "{{direction}}")],
        unit="Bps",
    ))
    return ps


def query_var(name: str, label: str, query: str, *, multi: bool = True) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "sort": 1,
        "regex": "",
        "hide": 0,
    }


def dashboard() -> dict:
    return {
        "uid": UID,
        "title": "respmeter",
        "description": "Billable Redis commands against the caps, traffic, commands saved by the proxy, "
                       "rejections, errors and latency of respmeter proxies.",
        "tags": ["respmeter", "redis"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                query_var("job", "Job", "label_values(respmeter_build_info, job)"),
                query_var("instance", "Instance", 'label_values(respmeter_build_info{job=~"$job"}, instance)'),
                query_var("client", "Client",
                          f"label_values(respmeter_commands_total{{{SEL}}}, client)"),
                query_var("command", "Command",
                          f'label_values(respmeter_commands_total{{{SEL},client=~"$client"}}, command)'),
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the output")
    ap.add_argument("--output", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    text = render()
    if ns.check:
        current = ns.output.read_text() if ns.output.exists() else ""
        if current != text:
            print(f"{ns.output} is stale: run python grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(text)
    print(f"wrote {ns.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
