"""Dashboards, alerts and the deploy kit, proven against real components.

* A real Prometheus (the ``prometheus`` binary, own config and storage, loopback, 1 s scrapes and
  rule evaluation, the alert rules of deploy/respmeter-alerts.yml loaded as they ship) scrapes three
  real proxies while real traffic flows through them: two proxies sharing one state directory (caps,
  a per-client cap, a rate limit rule) in front of a real redis-server, and one whose upstream is
  down. Then every dashboard query and every alert expression is evaluated through Prometheus's HTTP
  API: no error, and data. A copy of the dashboard (and of the rules) with one metric renamed must be
  caught by the same checks.
* ``promtool check config`` / ``check rules`` / ``test rules`` (unit tests for every alert, firing
  and not firing).
* Static checks: the dashboard JSON (generated, unique ids, datasource variable everywhere), and the
  deploy kit (compose, Kubernetes, Dockerfile, systemd) against the CLI's own option table: same
  env var names, values the CLI accepts, same ports, same health endpoint.

Needs ``prometheus`` and ``promtool`` on PATH (Debian package ``prometheus``; tests that need them
skip otherwise), ``redis-server``, and PyYAML.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ is on sys.path (rootdir conftest)
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

try:
    import yaml
except ImportError:  # pragma: no cover - reported by need_yaml()
    yaml = None

ROOT = support.REPO_ROOT
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "grafana"
DASHBOARD_JSON = GRAFANA / "dashboards" / "respmeter.json"
ALERTS = DEPLOY / "respmeter-alerts.yml"
ALERT_TESTS = DEPLOY / "respmeter-alerts.test.yml"
PROM_CONFIG = DEPLOY / "prometheus.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="prometheus/promtool not on PATH (apt-get install prometheus)"
)

# What Grafana would put in for its built-in variables when the test evaluates a query.
GRAFANA_BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "15s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
DASHBOARD_VARIABLES = ("job", "instance", "client", "command")


def need_yaml() -> Any:
    if yaml is None:
        pytest.fail("PyYAML is required by tests/test_observability.py: add 'pyyaml' to the [test] extras",
                    pytrace=False)
    return yaml


def load_yaml(path: Path) -> Any:
    return need_yaml().safe_load(path.read_text())


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


# ---------------------------------------------------------------------------------------------
# PromQL helpers: variables, metric selectors, top-level operands
# ---------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}) the way Grafana would; an unknown variable is an error."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        raise AssertionError(f"unknown variable ${name} in {expr!r}")

    return _VAR.sub(repl, expr)


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana's Prometheus datasource interpolates it into a query:
    ``(v1|v2)`` with regex metacharacters escaped by ``\\\\`` (an escaped backslash in the PromQL string)."""
    escaped = [re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", v) for v in values]
    return "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]


_AGG_MODIFIERS = ("by", "without", "on", "ignoring", "group_left", "group_right")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*")


def _skip_string(s: str, i: int) -> int:
    q = s[i]
    i += 1
    while i < len(s) and s[i] != q:
        i += 2 if s[i] == "\\" and q != "`" else 1
    return i + 1


def _skip_group(s: str, i: int) -> int:
    """From an opening bracket at ``i``, the index just past its match (strings respected)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[s[i]]]
    i += 1
    while i < len(s) and stack:
        c = s[i]
        if c in "\"'`":
            i = _skip_string(s, i)
            continue
        if c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        i += 1
    return i


def selectors(expr: str) -> list[tuple[str, str]]:
    """The metric selectors of a PromQL expression: ``[(metric name, selector text)]``."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c in "[{":
            i = _skip_group(expr, i)
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = _NUMBER.match(expr, i)
            i = m.end() if m else i + 1
        elif c.isalpha() or c in "_:":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] in "_:"):
                j += 1
            word = expr[i:j]
            k = j
            while k < n and expr[k].isspace():
                k += 1
            if word in _AGG_MODIFIERS:
                i = _skip_group(expr, k) if k < n and expr[k] == "(" else j
                continue
            if word.lower() in _KEYWORDS:
                i = j
                continue
            if k < n and expr[k] == "(":  # a function or an aggregation
                i = j
                continue
            nxt = re.match(r"(by|without)\b", expr[k:])
            if nxt:  # "sum by (x) (...)": an aggregation
                i = j
                continue
            if k < n and expr[k] == "{":
                end = _skip_group(expr, k)
                out.append((word, word + expr[k:end]))
                i = end
            else:
                out.append((word, word))
                i = j
        else:
            i += 1
    return out


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


_OPS = ("==", "!=", ">=", "<=", ">", "<")


def _top_level_split(expr: str) -> list[str]:
    parts, start, i, n = [], 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        if c in "([{":
            i = _skip_group(expr, i)
            continue
        op = next((o for o in _OPS if expr.startswith(o, i)), None)
        if op and not expr.startswith("=~", i) and not expr.startswith("!~", i):
            parts.append(expr[start:i])
            i += len(op)
            start = i
            continue
        m = re.match(r"(and|or|unless)\b", expr[i:])
        if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
            parts.append(expr[start:i])
            i += m.end()
            start = i
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def operands(expr: str) -> list[str]:
    """The operands of the top-level comparisons and set operators (``a > b and c`` -> a, b, c),
    recursively into fully parenthesised operands; numeric literals dropped."""
    out = []
    for part in _top_level_split(expr):
        p = part.strip()
        while True:  # operator modifiers: "> bool x", "and on (job) x"
            m = re.match(r"(bool\b|(on|ignoring|group_left|group_right)\s*\()", p)
            if not m:
                break
            p = p[m.end():].lstrip() if m.group(1) == "bool" else p[_skip_group(p, p.index("(")):].lstrip()
        if not p or _NUMBER.fullmatch(p):
            continue
        if p.startswith("(") and _skip_group(p, 0) == len(p):
            inner = p[1:-1]
            if len(_top_level_split(inner)) > 1:
                out.extend(operands(inner))
                continue
        out.append(p)
    return out


def test_promql_helpers() -> None:
    e = ('sum by (command, le) (rate(respmeter_x_bucket{a="1",b=~"$v|}"}[5m])) / on (job) '
         'max without (i) (respmeter_y) > bool 0.5 and up{job="r"} offset 1h')
    assert selectors(e) == [("respmeter_x_bucket", 'respmeter_x_bucket{a="1",b=~"$v|}"}'),
                            ("respmeter_y", "respmeter_y"), ("up", 'up{job="r"}')]
    assert operands("(max by (job) (a) / max by (job) (b)) >= 0.8 < 1") == \
        ["(max by (job) (a) / max by (job) (b))"]
    assert operands("((a > b) and c)") == ["a", "b", "c"]
    assert operands("(x + y) > z and w < on (job) v") == ["(x + y)", "z", "w", "v"]
    assert operands("up == 0") == ["up"]
    assert operands('topk(5, sum(rate(a{x!="1"}[1m])))') == ['topk(5, sum(rate(a{x!="1"}[1m])))']
    assert grafana_regex(["127.0.0.1:1", "client|x"]) == r"(127\\.0\\.0\\.1:1|client\\|x)"
    assert substitute('a{i=~"$instance"}[$__rate_interval]', {"instance": ".*"}) == 'a{i=~".*"}[5m]'
    with pytest.raises(AssertionError):
        substitute("a{i=~\"$instnace\"}", {"instance": ".*"})


# ---------------------------------------------------------------------------------------------
# the dashboard, statically
# ---------------------------------------------------------------------------------------------


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def query_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p.get("type") != "row"]


def dashboard_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every panel target."""
    return [(p["title"], t["refId"], t["expr"]) for p in query_panels(dash) for t in p["targets"]]


def variable_queries(dash: dict) -> dict[str, str]:
    out = {}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out[v["name"]] = q["query"] if isinstance(q, dict) else q
    return out


def label_values_parts(query: str) -> tuple[str, str]:
    """``label_values(SELECTOR, LABEL)`` -> (SELECTOR, LABEL)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
    assert m, f"not a label_values(selector, label) query: {query}"
    return m.group(1), m.group(2)


def test_dashboard_json_is_generated_and_well_formed() -> None:
    gen = subprocess.run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, "grafana/dashboards/respmeter.json is stale:\n" + gen.stderr

    dash = load_dashboard()
    assert dash["uid"] == "respmeter-overview"
    assert dash["title"] == "respmeter"

    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in DASHBOARD_VARIABLES:
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert v["includeAll"] and v["allValue"] == ".*", name
        label_values_parts(variable_queries(dash)[name])

    want_ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = query_panels(dash)
    assert len(panels) >= 15
    for p in panels:
        assert p["datasource"] == want_ds, p["title"]
        assert p["targets"], p["title"]
        assert p.get("description"), f"{p['title']}: no description"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == want_ds, (p["title"], t["refId"])
            substitute(t["expr"], {n: ".*" for n in DASHBOARD_VARIABLES})  # only known variables
            assert 'instance=~"$instance"' in t["expr"] and 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
    for p in all_panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]

    # No hard-coded datasource anywhere: every "datasource" object is the variable.
    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if "datasource" in o:
                assert o["datasource"] == want_ds, o
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk({k: v for k, v in dash.items() if k != "templating"})
    walk([v for v in dash["templating"]["list"] if v["name"] != "datasource"])

    # The panels the issue asks for exist.
    titles = " | ".join(p["title"] for p in panels).lower()
    for needle in ("% of the daily cap", "% of the monthly cap", "commands/s by command", "commands/s by client",
                   "top billable commands", "rejected and throttled", "latency p50", "latency p99",
                   "upstream errors and quota errors", "connections", "bytes"):
        assert needle in titles, needle
    exprs = " ".join(e for _, _, e in dashboard_queries(dash))
    assert "respmeter_quota_reset_timestamp_seconds" in exprs and "time()" in exprs  # projections


def test_dashboard_combines_instances_correctly() -> None:
    """Counters are summed over instances; the shared quota gauges use max, never sum."""
    for title, ref, expr in dashboard_queries(load_dashboard()):
        for m in re.finditer(r"(\w+)\s*(?:by\s*\([^)]*\)\s*)?\(\s*(respmeter_quota_\w+)", expr):
            assert m.group(1) == "max", f"{title}/{ref}: {m.group(2)} must be combined with max(): {expr}"
        for m in re.finditer(r"(\w+)\s*\(\s*(respmeter_\w+_total)\b", expr):
            assert m.group(1) in ("rate", "increase"), f"{title}/{ref}: counter {m.group(2)} not rated: {expr}"
        if re.search(r"\brate\(", expr):
            assert re.search(r"\b(sum|histogram_quantile|topk)\b", expr), f"{title}/{ref}: rates not summed: {expr}"


# ---------------------------------------------------------------------------------------------
# Grafana provisioning, prometheus.yml and alert rules with promtool
# ---------------------------------------------------------------------------------------------


def compose() -> dict:
    return load_yaml(DEPLOY / "docker-compose.yml")


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (resolved against deploy/) of a compose service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (DEPLOY / src).resolve()
    return out


def test_grafana_provisioning_matches_compose() -> None:
    services = compose()["services"]
    graf = services["grafana"]
    mounts = _mounts(graf)
    for dst, src in mounts.items():
        assert src.exists(), f"grafana mount {src} -> {dst} does not exist"

    ds_dir = mounts["/etc/grafana/provisioning/datasources"]
    (ds_file,) = ds_dir.glob("*.yml")
    (ds,) = load_yaml(ds_file)["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy"
    host_port = urllib.parse.urlsplit(ds["url"]).netloc
    host, port = host_port.split(":")
    assert host in services, f"datasource url {ds['url']}: no compose service {host!r}"
    assert port == "9090" and "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    prom_cfg = load_yaml(PROM_CONFIG)
    assert ds["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]

    prov_dir = mounts["/etc/grafana/provisioning/dashboards"]
    (prov_file,) = prov_dir.glob("*.yml")
    (provider,) = load_yaml(prov_file)["providers"]
    assert provider["type"] == "file"
    dash_dir = provider["options"]["path"]
    assert mounts[dash_dir] == DASHBOARD_JSON.parent
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD_JSON.name}"

    prom = services["prometheus"]
    pm = _mounts(prom)
    assert pm["/etc/prometheus/prometheus.yml"] == PROM_CONFIG
    for rule_file in prom_cfg["rule_files"]:
        assert pm[f"/etc/prometheus/{rule_file}"] == (DEPLOY / rule_file).resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


@needs_promtool
def test_promtool_check_config_and_rules() -> None:
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(ALERTS)]):
        r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


def alert_rules(rules_doc: dict | None = None) -> list[dict]:
    doc = rules_doc if rules_doc is not None else load_yaml(ALERTS)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_unit_tests_cover_every_alert() -> None:
    r = subprocess.run([PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                       timeout=120, cwd=DEPLOY)
    assert r.returncode == 0, f"promtool test rules:\n{r.stdout}\n{r.stderr}"
    assert "SUCCESS" in r.stdout

    doc = load_yaml(ALERT_TESTS)
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert len(names) >= 7
    assert names - fires == set(), f"alerts without a test case where they fire: {names - fires}"
    assert names - silent == set(), f"alerts without a test case where they stay silent: {names - silent}"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]


def test_alert_rules_combine_instances_correctly() -> None:
    """The alerts follow the dashboard's rule: max() of the shared quota gauges, sum() of counters."""
    for rule in alert_rules():
        expr = rule["expr"]
        for m in re.finditer(r"(\w+)\s*(?:by\s*\([^)]*\)\s*)?\(\s*(respmeter_quota_\w+)", expr):
            assert m.group(1) == "max", f"{rule['alert']}: {m.group(2)} must be combined with max()"
        for m in re.finditer(r"(\w+)\s*\(\s*(respmeter_\w+_total)\b", expr):
            assert m.group(1) in ("rate", "increase"), f"{rule['alert']}: counter {m.group(2)} not rated"


# ---------------------------------------------------------------------------------------------
# the deploy kit against the CLI
# ---------------------------------------------------------------------------------------------


def _run_options() -> Any:
    from proxy.options import RUN_OPTIONS

    return RUN_OPTIONS


def valid_env_names() -> set[str]:
    return {o.env for o in _run_options()} | {"RESPMETER_UPSTREAM_PASSWORD"}


def option_default_port(flag: str) -> int:
    from proxy.config import parse_hostport

    (opt,) = [o for o in _run_options() if o.flag == flag]
    default = opt.default[0] if isinstance(opt.default, list) else opt.default
    return parse_hostport(default, flag)[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in dockerfile_instructions():
        if ins == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


_COMPOSE_INTERP = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: _COMPOSE_INTERP.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def k8s_docs() -> dict[str, dict]:
    docs: dict[str, dict] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in need_yaml().safe_load_all(path.read_text()):
            if d:
                docs[d["kind"]] = d
    return docs


def k8s_env() -> dict[str, str]:
    docs = k8s_docs()
    env = dict(docs["ConfigMap"]["data"])
    secret = docs["Secret"].get("stringData", {})
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == docs["Secret"]["metadata"]["name"], e["name"]
            if ref["key"] in secret:
                env[e["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"{e['name']}: secret key {ref['key']} missing and not optional"
        else:
            env[e["name"]] = e["value"]
    return env


def systemd_env() -> dict[str, str]:
    env: dict[str, str] = {}
    unit = (DEPLOY / "systemd" / "respmeter.service").read_text()
    for line in unit.splitlines():
        if line.startswith("Environment="):
            k, _, v = line[len("Environment="):].partition("=")
            env[k] = v
    for line in (DEPLOY / "systemd" / "respmeter.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    return env


def resolve_env(env: dict[str, str]) -> tuple[dict[str, Any], Any, Any]:
    """The options ``respmeter run`` would resolve from this environment, with its own parser
    (a rejected value fails the test with the CLI's message)."""
    from proxy.cli import build_parser, resolve
    from proxy.config import parse_hostport, parse_listen, parse_upstream

    parser = build_parser()
    ns = parser.parse_args(["run"])
    try:
        opts = resolve(_run_options(), ns, env, parser)
    except SystemExit:
        pytest.fail(f"respmeter run rejects this environment: {env}", pytrace=False)
    listens = [parse_listen(x) for x in opts["listen"]]
    parse_hostport(opts["admin"], "--admin")
    upstream = parse_upstream(opts["upstream"])
    return opts, listens, upstream


def _port(addr: str) -> int:
    from proxy.config import parse_hostport

    return parse_hostport(addr, "addr")[1]


def test_deploy_env_vars_are_real_options() -> None:
    """Every RESPMETER_* name in the deploy kit is a `respmeter run` option's env var."""
    valid = valid_env_names()
    files = [ROOT / "Dockerfile", *DEPLOY.rglob("*"), *GRAFANA.rglob("*")]
    seen = set()
    for f in files:
        if not f.is_file() or f.suffix in (".pyc",):
            continue
        for name in re.findall(r"RESPMETER_[A-Z0-9_]+", f.read_text(errors="replace")):
            seen.add(name)
            assert name in valid, f"{f.relative_to(ROOT)}: {name} is not an option of `respmeter run`"
    assert {"RESPMETER_LISTEN", "RESPMETER_ADMIN", "RESPMETER_STATE_DIR", "RESPMETER_UPSTREAM"} <= seen


def test_deploy_kit_agrees_with_cli() -> None:
    from proxy.admin import AdminServer
    from proxy.cli import check_safety
    from proxy.config import ConfigError

    proxy_port = option_default_port("--listen")
    admin_port = option_default_port("--admin")
    assert (proxy_port, admin_port) == (6380, 9380)
    assert "/healthz" in AdminServer(None, None).routes  # type: ignore[arg-type]
    assert "/metrics" in AdminServer(None, None).routes  # type: ignore[arg-type]

    # -- Dockerfile -----------------------------------------------------------------------------
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all("slim" in f or "${" in f for f in froms)
    arg_defaults = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert all(re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", v) for v in arg_defaults.values()), arg_defaults
    user = [a for i, a in ins if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()} == {proxy_port, admin_port}
    denv = dockerfile_env()
    assert _port(denv["RESPMETER_LISTEN"]) == proxy_port and _port(denv["RESPMETER_ADMIN"]) == admin_port
    volumes = [v for i, a in ins if i == "VOLUME" for v in json.loads(a)]
    assert denv["RESPMETER_STATE_DIR"] in volumes
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/healthz" in health and "RESPMETER_ADMIN" in health and f":{admin_port}" in health
    assert "urllib" in health and "curl" not in health
    entry = [a for i, a in ins if i == "ENTRYPOINT"][-1]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entry) == ["respmeter"] and "respmeter" in scripts
    for i, a in ins:
        if i == "COPY" and not a.startswith("--from"):
            for src in shlex.split(a)[:-1]:
                if "*" not in src:
                    assert (ROOT / src).exists(), f"Dockerfile COPY {src}: missing"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for needed in ("proxy", "pyproject.toml", "README.md"):
        assert needed not in ignored, f".dockerignore excludes {needed}"
    # The image alone listens on 0.0.0.0 and so must refuse to start until the user chooses
    # RESPMETER_USERS or RESPMETER_ALLOW_UNAUTHENTICATED (fails closed).
    opts, listens, upstream = resolve_env(denv)
    with pytest.raises(ConfigError, match="without client authentication"):
        check_safety(opts, listens, upstream)
    # ... and until they choose RESPMETER_ADMIN_TOKEN(_FILE) or RESPMETER_ALLOW_UNAUTHENTICATED_ADMIN
    with pytest.raises(ConfigError, match="admin endpoint on 0.0.0.0:9380 without a token"):
        check_safety({**opts, "allow_unauthenticated": True}, listens, upstream)

    # -- docker compose -------------------------------------------------------------------------
    services = compose()["services"]
    rm = services["respmeter"]
    assert (DEPLOY / rm["build"]["context"] / rm["build"].get("dockerfile", "Dockerfile")).resolve() == \
        ROOT / "Dockerfile"
    cenv = {**denv, **compose_env(rm)}
    opts, listens, upstream = resolve_env(cenv)
    check_safety(opts, listens, upstream)  # compose chose RESPMETER_ALLOW_UNAUTHENTICATED(_ADMIN)
    assert opts["allow_unauthenticated"] is True and opts["allow_unauthenticated_admin"] is True
    assert {_port(x) for x in opts["listen"]} == {proxy_port} and _port(opts["admin"]) == admin_port
    published = {}
    for p in rm["ports"]:
        host_ip, host_port, container_port = p.split(":")
        assert host_ip == "127.0.0.1", f"compose publishes {p} beyond loopback"
        published[int(container_port)] = int(host_port)
    assert set(published) == {proxy_port, admin_port}
    assert any(v.split(":")[1] == opts["state_dir"] for v in rm["volumes"])
    assert upstream.host in services, "the default upstream is the bundled redis service"
    (scrape,) = load_yaml(PROM_CONFIG)["scrape_configs"]
    (targets,) = [sc["targets"] for sc in scrape["static_configs"]]
    assert targets == [f"respmeter:{admin_port}", f"respmeter-2:{admin_port}"]
    assert scrape.get("metrics_path", "/metrics") == "/metrics"
    # the second instance is the first one's twin, sharing its caps (through the upstream)
    r2 = services["respmeter-2"]
    assert compose_env(r2) == compose_env(rm) and opts["state_url"] == "upstream"
    assert [p.split(":")[0] for p in r2["ports"]] == ["127.0.0.1", "127.0.0.1"]
    # how to send an admin token is shown (commented out: the compose demo runs without one)
    lines = PROM_CONFIG.read_text().splitlines()
    (start,) = [i for i, ln in enumerate(lines) if ln.strip() == "# authorization:"]
    col = lines[start].index("#")
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln[col:].startswith("#   "):
            break
        block.append(ln)
    auth = need_yaml().safe_load("\n".join(ln[col + 2:] for ln in block))["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials_file"], auth

    # -- Kubernetes -----------------------------------------------------------------------------
    docs = k8s_docs()
    assert {"ConfigMap", "Secret", "Deployment", "Service"} <= set(docs)
    kustom = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    assert sorted(kustom["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                                 if p.name != "kustomization.yaml")
    kenv = {**denv, **k8s_env()}
    opts, listens, upstream = resolve_env(kenv)
    check_safety(opts, listens, upstream)  # k8s chose proxy users and an admin token
    assert opts["users"] and opts["admin_token"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"redis": proxy_port, "admin": admin_port}
    assert {_port(x) for x in opts["listen"]} == {proxy_port} and _port(opts["admin"]) == admin_port

    def resolve_port(p: Any) -> int:
        return ports[p] if isinstance(p, str) else p

    ready = c["readinessProbe"]["httpGet"]
    assert ready["path"] == "/healthz" and resolve_port(ready["port"]) == admin_port
    live = c["livenessProbe"]
    assert "tcpSocket" in live or live.get("httpGet", {}).get("path") != "/healthz", \
        "liveness must not use /healthz (503 while the upstream is down would restart the proxy)"
    if "tcpSocket" in live:
        assert resolve_port(live["tcpSocket"]["port"]) in (proxy_port, admin_port)
    svc_ports = {p["name"]: (p["port"], resolve_port(p["targetPort"])) for p in docs["Service"]["spec"]["ports"]}
    assert svc_ports == {"redis": (proxy_port, proxy_port), "admin": (admin_port, admin_port)}
    sel = docs["Service"]["spec"]["selector"]
    assert all(docs["Deployment"]["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
    ann = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(admin_port) and ann["prometheus.io/path"] == "/metrics"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert opts["state_dir"] in mounts
    vols = {v["name"]: v for v in pod["volumes"]}
    # the replicas share the caps through the upstream; each keeps its own counts locally
    assert docs["Deployment"]["spec"]["replicas"] >= 2 and opts["state_url"] == "upstream"
    assert "emptyDir" in vols[mounts[opts["state_dir"]]]
    users_dir, users_file = os.path.split(opts["users"])
    users_vol = vols[mounts[users_dir]]["secret"]
    assert users_vol["secretName"] == docs["Secret"]["metadata"]["name"]
    assert [i["path"] for i in users_vol["items"]] == [users_file]
    assert users_vol["items"][0]["key"] in docs["Secret"]["stringData"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])

    # -- systemd --------------------------------------------------------------------------------
    unit = (DEPLOY / "systemd" / "respmeter.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start.split()[0].endswith("/respmeter") and exec_start.split()[1:] == ["run"]
    senv = systemd_env()
    opts, listens, upstream = resolve_env(senv)
    check_safety(opts, listens, upstream)  # loopback
    assert {_port(x) for x in opts["listen"]} == {proxy_port} and _port(opts["admin"]) == admin_port
    (state_dir,) = re.findall(r"^StateDirectory=(.*)$", unit, re.M)
    assert opts["state_dir"] == f"/var/lib/{state_dir}"
    assert f"EnvironmentFile=/etc/respmeter/{(DEPLOY / 'systemd' / 'respmeter.env').name}" in unit
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / "respmeter.service")],
                           capture_output=True, text=True, timeout=60)
        # the only acceptable complaint: the binary is not installed on this machine
        problems = [line for line in (r.stdout + r.stderr).splitlines()
                    if "respmeter.service" in line and "/opt/respmeter/bin/respmeter" not in line]
        assert not problems, problems


# ---------------------------------------------------------------------------------------------
# a real Prometheus scraping real proxies under real traffic
# ---------------------------------------------------------------------------------------------


class Prometheus:
    START_TIMEOUT = 30.0

    def __init__(self, config: dict, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        cfg_path = self.workdir / "prometheus.yml"
        cfg_path.write_text(need_yaml().safe_dump(self.config))
        log_path = self.workdir / "prometheus.log"
        for _attempt in range(3):
            self.port = support.free_port()
            argv = [PROMETHEUS, f"--config.file={cfg_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                    "--log.level=warn"]
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(support._deathsig_prefix() + argv, cwd=self.workdir,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            support._register(self.proc)
            deadline = time.monotonic() + self.START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.1)
            self.stop()
            text = log_path.read_text(errors="replace")
            if "address already in use" not in text.lower():
                break
        raise support.ProcessStartError(f"prometheus did not start:\n{log_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            support._unregister(self.proc)

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            body = json.load(exc)
        return body

    def query(self, expr: str) -> tuple[str | None, list]:
        """(error or None, result list) of an instant query now."""
        body = self.api("query", query=expr)
        if body.get("status") != "success":
            return f"{body.get('errorType')}: {body.get('error')}", []
        data = body["data"]
        if data["resultType"] == "scalar":
            return None, [{"metric": {}, "value": data["result"]}]
        return None, data["result"]

    def value(self, expr: str) -> float | None:
        err, res = self.query(expr)
        assert err is None, err
        return float(res[0]["value"][1]) if res else None


def _values(result: list) -> list[float]:
    out = []
    for r in result:
        if "value" in r:
            out.append(float(r["value"][1]))
        else:
            out.extend(float(v) for _, v in r.get("values", []))
    return out


@dataclass
class Stack:
    prom: Prometheus
    proxies: dict[str, support.ProxyProcess]
    exported: set[str] = field(default_factory=set)  # sample names in the proxies' /metrics

    def check_queries(self, queries: list[tuple[str, str]], values: dict[str, str], *,
                      need_data: bool = True) -> list[str]:
        """Evaluate (name, expr) pairs; return the problems: errors, empty results, selectors that
        match nothing, metric names the proxies do not export."""
        problems = []
        for name, raw in queries:
            expr = substitute(raw, values)
            for metric in sorted(metric_names(expr) - self.exported - {"up"}):
                problems.append(f"{name}: metric {metric} is not exported by the proxy")
            err, res = self.prom.query(expr)
            if err:
                problems.append(f"{name}: {err}\n    {expr}")
                continue
            if not need_data:
                continue
            vals = _values(res)
            if not vals:
                problems.append(f"{name}: no data\n    {expr}")
            elif all(math.isnan(v) for v in vals):
                problems.append(f"{name}: only NaN\n    {expr}")
            for _, sel in selectors(expr):
                err, res = self.prom.query(f"count({sel})")
                if err or not res:
                    problems.append(f"{name}: selector matches no series: {sel} {err or ''}")
        return problems

    def check_alerts(self, rules: list[dict]) -> list[str]:
        """Each alert expression evaluates, and each operand of its comparisons has data."""
        problems = []
        for rule in rules:
            expr = rule["expr"]
            err, _ = self.prom.query(expr)
            if err:
                problems.append(f"{rule['alert']}: {err}")
                continue
            ops = operands(expr)
            assert ops, rule["alert"]
            problems += self.check_queries([(f"{rule['alert']} operand {i}", op) for i, op in enumerate(ops)], {})
        return problems


def _all_values() -> dict[str, str]:
    return {name: ".*" for name in DASHBOARD_VARIABLES}


def _traffic(a1: support.ProxyProcess, a2: support.ProxyProcess, down: support.ProxyProcess,
             seconds: float = 4.0) -> dict[str, int]:
    """A mix of commands for ``seconds``: ok, errors, throttled, quota errors, cap rejections."""
    import redis

    web = a1.client(client_name="web")
    worker = a2.client(client_name="worker")
    lost = down.client(client_name="web", socket_timeout=5)
    seen = {"ok": 0, "error": 0, "capped": 0}
    # the upstream says its quota is used up (as Upstash does): counted, /healthz 503 for a minute
    script = "return redis.error_reply('ERR max requests limit exceeded')"
    rounds = 0
    start = time.monotonic()
    # at least ``seconds`` (several scrapes), and until the shared daily cap has refused commands
    while rounds < 200 and time.monotonic() - start < 30 and (
            time.monotonic() - start < seconds or not seen["capped"]):
        ops = [
            lambda: web.set(f"obs:k{rounds}", rounds),
            lambda: web.get(f"obs:k{rounds}"),  # 1/s rate limit, action=reject
            lambda: web.get("obs:k0"),
            lambda: worker.incr("obs:counter"),
            lambda: worker.hset("obs:h", f"f{rounds}", rounds),  # 20/s rate limit, action=delay
            lambda: worker.lrange("obs:list", 0, -1),
            lambda: worker.ping(),  # answered by a2's ping saver (the upstream just replied)
            lambda: lost.ping(),  # upstream down
        ]
        if rounds == 0:
            ops += [
                lambda: web.eval(script, 0),
                lambda: web.lpush(f"obs:k{rounds}", 1),  # WRONGTYPE
                lambda: web.execute_command("NOSUCHCOMMAND"),
                lambda: worker.rpush("obs:list", "a", "b"),
            ]
        for op in ops:
            try:
                op()
                seen["ok"] += 1
            except (redis.ResponseError, redis.ConnectionError) as exc:
                seen["error"] += 1
                seen["capped"] += "daily cap" in str(exc)
        rounds += 1
        time.sleep(0.15)
    return seen


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool not on PATH (apt-get install prometheus)")
    if shutil.which(support.REDIS_SERVER_BIN) is None:
        pytest.fail("redis-server not on PATH", pytrace=False)
    need_yaml()
    started: list[Any] = []
    prom = None
    failed = True
    try:
        redis_server = support.RedisServer(workdir=tmp_path_factory.mktemp("obs-redis")).start()
        started.append(redis_server)
        shared = tmp_path_factory.mktemp("obs-state-shared")
        capped = [
            "--state-dir", str(shared), "--daily-cap", "60", "--monthly-cap", "100000",
            "--client-cap", "web:daily=1000",
            "--rate-limit", "name=slow,command=get,rate=1/s,burst=1,action=reject",
            "--rate-limit", "name=gentle,command=hset,rate=20/s,burst=2,action=delay",
        ]
        proxies: dict[str, support.ProxyProcess] = {}
        for name in ("a1", "a2"):
            # a2 answers PING itself (--savers ping): respmeter_saved_commands_total has data
            extra = ["--savers", "ping"] if name == "a2" else []
            p = support.ProxyProcess(redis_server, capped + extra, workdir=tmp_path_factory.mktemp(f"obs-{name}"),
                                     log_level="info")
            started.append(p.start())
            proxies[name] = p
        dead = f"redis://127.0.0.1:{support.free_port()}"  # nothing listens there
        down = support.ProxyProcess(dead, ["--state-dir", str(tmp_path_factory.mktemp("obs-state-down")),
                                           "--connect-timeout", "1"],
                                    workdir=tmp_path_factory.mktemp("obs-down"), log_level="info")
        started.append(down.start())
        proxies["down"] = down

        config = load_yaml(PROM_CONFIG)
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(ALERTS)]
        (job,) = config["scrape_configs"]
        job["scrape_interval"] = job["scrape_timeout"] = "1s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p.admin_port}" for p in proxies.values()]}]
        prom = Prometheus(config, tmp_path_factory.mktemp("obs-prometheus")).start()
        # Prometheus applies new targets after a few seconds: let scraping start before the traffic,
        # so that the counters are seen growing (rate() > 0), not just at their final values.
        deadline = time.monotonic() + 20
        while len(prom.query('up{job="respmeter"} == 1')[1]) < len(proxies):
            assert time.monotonic() < deadline, f"Prometheus does not scrape the proxies: {prom.query('up')}"
            time.sleep(0.2)

        seen = _traffic(proxies["a1"], proxies["a2"], down)
        assert seen["capped"], f"the traffic never reached the daily cap: {seen}"

        # Wait until Prometheus holds the final counts of every proxy, then two more scrapes (so
        # every series has >= 2 samples for rate()).
        want = {f"127.0.0.1:{p.admin_port}": support.metric_sum(p.metrics(), "respmeter_commands_total", by=())
                .get((), 0.0) for p in proxies.values()}
        want = {k: v for k, v in want.items() if v}  # a proxy without commands has no such series
        deadline = time.monotonic() + 20
        while True:
            _, res = prom.query('sum by (instance) (respmeter_commands_total{job="respmeter"})')
            got = {r["metric"]["instance"]: float(r["value"][1]) for r in res}
            if got == want:
                break
            assert time.monotonic() < deadline, f"Prometheus has {got}, the proxies say {want}"
            time.sleep(0.2)
        time.sleep(2.5)

        st = Stack(prom, proxies)
        for p in proxies.values():
            st.exported |= {s.name for s in p.metrics()}
        failed = False
        yield st
    finally:
        if prom is not None:
            prom.stop()
        for s in reversed(started):
            if isinstance(s, support.ProxyProcess):
                if failed:
                    print(f"\n===== {s!r} log =====\n{support._tail(s.log_path)}")
                try:
                    s.terminate(timeout=10)
                except TimeoutError as exc:
                    print(exc)
            else:
                s.stop()


def test_every_dashboard_and_alert_metric_is_exported(stack: Stack) -> None:
    dash = load_dashboard()
    used = set()
    for _, _, expr in dashboard_queries(dash):
        used |= metric_names(substitute(expr, _all_values()))
    for q in variable_queries(dash).values():
        used |= metric_names(substitute(label_values_parts(q)[0], _all_values()))
    missing = used - stack.exported
    assert not missing, f"dashboard metrics the proxy does not export: {missing}"
    alert_metrics = set()
    for rule in alert_rules():
        alert_metrics |= metric_names(rule["expr"])
    assert alert_metrics - stack.exported == {"up"}, alert_metrics - stack.exported
    # and the dashboard uses the proxy's whole vocabulary (nothing exported is left unseen)
    families = {re.sub(r"_(bucket|sum|count|total|info)$", "", n) for n in stack.exported}
    shown = {re.sub(r"_(bucket|sum|count|total|info)$", "", n) for n in used}
    assert families - shown == set(), f"exported but on no panel: {families - shown}"


def variable_values(stack: Stack) -> dict[str, list[str]]:
    """Each dashboard variable's values, from its label_values() query (variables at "All")."""
    out = {}
    for name, q in variable_queries(load_dashboard()).items():
        sel, label = label_values_parts(q)
        body = stack.prom.api("series", **{"match[]": substitute(sel, _all_values())})
        assert body["status"] == "success", body
        out[name] = sorted({s[label] for s in body["data"] if label in s})
    return out


def test_dashboard_variables_have_values(stack: Stack) -> None:
    values = variable_values(stack)
    for name, vals in values.items():
        assert vals, f"variable {name} has no values"
    assert set(values["client"]) >= {"web", "worker"}
    assert "client|setname" in values["command"]  # a value with a regex metacharacter
    assert len(values["instance"]) == 3 and values["job"] == ["respmeter"]


def test_every_panel_query_returns_data(stack: Stack) -> None:
    """Each panel query, with every variable at "All", evaluates without error and returns data, and
    each of its metric selectors matches series; then again with the variables set the way Grafana
    interpolates a multi-value selection of every value."""
    dash = load_dashboard()
    queries = [(f"{title} [{ref}]", expr) for title, ref, expr in dashboard_queries(dash)]
    problems = stack.check_queries(queries, _all_values())
    assert not problems, "dead or broken panels:\n" + "\n".join(problems)

    values = variable_values(stack)
    multi = {name: grafana_regex(vals) for name, vals in values.items()}
    problems = stack.check_queries(queries, multi)
    assert not problems, "panels broken with a multi-value selection:\n" + "\n".join(problems)
    # a single concrete value of each variable must still evaluate (data may legitimately be absent)
    single = {name: grafana_regex(vals[:1]) for name, vals in values.items()}
    problems = stack.check_queries(queries, single, need_data=False)
    assert not problems, "\n".join(problems)


def test_every_alert_expression_evaluates_with_data(stack: Stack) -> None:
    rules = alert_rules()
    problems = stack.check_alerts(rules)
    assert not problems, "alert expressions with errors or without data:\n" + "\n".join(problems)

    # Prometheus loaded the shipped rule file itself, and evaluates every rule without error.
    body = stack.prom.api("rules")
    loaded = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    deadline = time.monotonic() + 15
    want = {"RespmeterCapReached", "RespmeterUpstreamDown", "RespmeterUpstreamQuotaExceeded",
            "RespmeterUpstreamConnectErrors"}
    while True:
        body = stack.prom.api("rules")
        loaded = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
        active = {a["labels"]["alertname"] for r in loaded.values() for a in r.get("alerts", [])}
        if not bad and want <= active:
            break
        assert time.monotonic() < deadline, f"unhealthy rules {bad}; active alerts {active}, want {want}"
        time.sleep(0.5)
    # the per-job alerts fire once for the two proxies that share a state directory
    cap = [a for a in loaded["RespmeterCapReached"]["alerts"]]
    assert [(a["labels"]["window"], a["labels"]["client"]) for a in cap] == [("daily", "all")]
    down = loaded["RespmeterUpstreamDown"]["alerts"]
    assert [a["labels"]["instance"] for a in down] == [f"127.0.0.1:{stack.proxies['down'].admin_port}"]


def test_a_renamed_metric_is_detected(stack: Stack) -> None:
    """The checks above are not vacuous: a dashboard (or rule) naming a metric the proxy does not
    export, or a label value that does not exist, is reported."""
    dash = copy.deepcopy(load_dashboard())
    victim = next(p for p in query_panels(dash) if "respmeter_quota_used" in p["targets"][0]["expr"])
    victim["targets"][0]["expr"] = victim["targets"][0]["expr"].replace("respmeter_quota_used",
                                                                        "respmeter_quota_usage")
    queries = [(f"{t} [{r}]", e) for t, r, e in dashboard_queries(dash)]
    problems = stack.check_queries(queries, _all_values())
    label = f"{victim['title']} [{victim['targets'][0]['refId']}]"
    assert any(p.startswith(f"{label}: metric respmeter_quota_usage is not exported") for p in problems), problems
    assert any(p.startswith(f"{label}: no data") for p in problems), problems
    assert all(p.startswith(label) for p in problems), problems

    # a wrong label value is caught by the selector check even where the query still has data
    queries = [("typo", 'sum(rate(respmeter_commands_total{outcome="rejectd"}[1m])) or vector(0)')]
    problems = stack.check_queries(queries, {})
    assert problems and "selector matches no series" in problems[0], problems

    rules = copy.deepcopy(alert_rules())
    victim_rule = next(r for r in rules if r["alert"] == "RespmeterUpstreamDown")
    victim_rule["expr"] = victim_rule["expr"].replace("respmeter_upstream_up", "respmeter_upstream_upp")
    problems = stack.check_alerts(rules)
    assert problems and all(p.startswith("RespmeterUpstreamDown") for p in problems), problems


def test_shared_state_gauges_use_max_and_counters_add_up(stack: Stack) -> None:
    """Two proxies share a state directory: each reports the same (shared) daily usage, the panel
    shows it once (max), and the per-process billable counters add up to it (sum)."""
    a1, a2 = stack.proxies["a1"], stack.proxies["a2"]
    u1 = json.loads(a1.http_get("/api/usage")[1])["windows"]["daily"]
    u2 = json.loads(a2.http_get("/api/usage")[1])["windows"]["daily"]
    assert u1["used"] == u2["used"] == u1["cap"] == 60, (u1, u2)  # the cap was reached

    dash = load_dashboard()
    (used_expr,) = [e for t, r, e in dashboard_queries(dash) if t == "Today: billable commands" and r == "A"]
    shown = stack.prom.value(substitute(used_expr, _all_values()))
    assert shown == 60
    summed = stack.prom.value(substitute(used_expr.replace("max(", "sum(", 1), _all_values()))
    assert summed == 120  # what a sum() over the instances would wrongly show

    billable = stack.prom.value('sum(respmeter_upstream_commands_total{instance=~"%s"})'
                                % grafana_regex([f"127.0.0.1:{a1.admin_port}", f"127.0.0.1:{a2.admin_port}"]))
    assert billable == 60
    rejected = stack.prom.value('sum(respmeter_cap_rejections_total{window="daily"})')
    assert rejected and rejected > 0
