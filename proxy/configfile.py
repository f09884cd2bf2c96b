"""The TOML config file (stdlib tomllib) and its validation.

Layout (every key optional)::

    [proxy]                     # any `respmeter run` option, named as its flag without dashes
    listen = ["127.0.0.1:6380"]
    upstream = "rediss://default@example.upstash.io:6379"
    state_dir = "/var/lib/respmeter"

    [caps]
    daily = 10000
    monthly = 500000
    timezone = "UTC"
    on_cap = "idle"             # or "error"

    [caps.clients.celery]       # per client identity
    daily = 5000

    [commands]
    deny = ["@default", "flushall"]   # see proxy.commandpolicy

    [[rate_limit]]
    name = "celery-polling"
    client = "celery"           # glob on the identity
    command = "brpop"           # glob on the command (commandstats naming)
    rate = "6/min"
    burst = 1
    action = "delay"            # or "reject"
    max_queue = 1000

    [users.celery]
    password_hash = "scrypt$..."
    label = "celery"

Every problem is reported with its place (``file:line: key: message``); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .auth import User, users_problems
from .commandpolicy import entry_problems
from .limits import CapConfig, LimitsConfigError, RateRule, parse_rate
from .config import ConfigError, check_state_url, parse_hostport, parse_listen, parse_upstream
from .options import RUN_OPTIONS, Option, _bool

TOP_KEYS = {"proxy", "caps", "rate_limit", "users", "commands", "savers", "state", "upstream"}
STATE_KEYS = {"url": "state_url", "fail": "state_fail", "instance": "instance"}
UPSTREAM_KEYS = {"pool": "upstream_pool"}
# [savers] keys -> run options
SAVERS_KEYS = {"enable": "savers", "hold": "saver_hold", "recheck": "saver_recheck",
               "channels": "saver_channels", "sweep_every": "saver_sweep_every"}
COMMANDS_KEYS = {"deny"}
CAP_KEYS = {"daily", "monthly", "timezone", "on_cap", "clients"}
RULE_KEYS = {"name", "client", "command", "rate", "burst", "action", "max_queue"}
# options that only make sense on the command line, or live in their own sections
NOT_IN_PROXY = {"config", "daily_cap", "monthly_cap", "client_cap", "cap_timezone", "on_cap", "rate_limit",
                "deny_commands", *SAVERS_KEYS.values(), *STATE_KEYS.values(), *UPSTREAM_KEYS.values()}


@dataclass
class FileConfig:
    path: str
    values: dict[str, Any] = field(default_factory=dict)  # run options by dest
    caps: dict[str, Any] = field(default_factory=dict)
    rules: list[RateRule] = field(default_factory=list)
    users: dict[str, User] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _locate(text: str, path: list[str | int]) -> int | None:
    """Best-effort line number of a key path in TOML source (1-based)."""
    lines = text.splitlines()
    tables: list[str] = []
    key = str(path[-1]) if path and not isinstance(path[-1], int) else None
    parents = [p for p in path[:-1]] if key is not None else list(path)
    # the table the key lives in, as written in a header
    header_parts: list[str] = []
    index = None
    for p in parents:
        if isinstance(p, int):
            index = p
        else:
            header_parts.append(p)
    header = ".".join(header_parts)
    seen = -1
    in_table = header == ""
    for i, line in enumerate(lines, 1):
        s = line.strip()
        m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
        if m:
            tables.append(m.group(1))
            name = m.group(1).replace('"', "")
            if name == header:
                seen += 1
                in_table = index is None or seen == index
                if in_table and key is None:
                    return i
            else:
                in_table = False
            continue
        if in_table and key is not None and re.match(r"^\s*\"?%s\"?\s*=" % re.escape(key), line):
            return i
    return None


_TOML_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|#[^\n]*')


def _locate_item(text: str, path: list[str | int], index: int) -> int | None:
    """Best-effort line number of the index-th string of the array at ``path`` (1-based)."""
    start = _locate(text, path)
    if start is None:
        return None
    rest = "\n".join(text.splitlines()[start - 1 :])
    n = 0
    for m in _TOML_STRING.finditer(rest, rest.find("=") + 1):
        if m.group().startswith("#"):
            continue
        if n == index:
            return start + rest.count("\n", 0, m.start())
        n += 1
    return start


class _Checker:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.problems: list[tuple[int, str]] = []  # (line, text)

    def problem(self, keypath: list[str | int], message: str, line: int | None = None) -> None:
        line = line or _locate(self.text, keypath)
        dotted = ""
        for p in keypath:
            dotted += f"[{p}]" if isinstance(p, int) else (("." if dotted else "") + p)
        where = f"{self.path}:{line}" if line else self.path
        self.problems.append((line or 0, f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}"))


def _convert(o: Option, value: Any) -> Any:
    """A config-file value for a run option, checked like the flag's."""
    if o.boolean:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if o.multiple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a string or a list of strings")
        return [o.type(v) for v in value]
    if isinstance(value, bool):
        if o.type is _bool:
            return value
        raise ValueError("must be a string or a number")
    if not isinstance(value, (str, int, float)):
        raise ValueError("must be a string or a number")
    v = o.type(str(value)) if not isinstance(value, str) or o.type is not str else value
    if o.choices and v not in o.choices:
        raise ValueError(f"must be one of {', '.join(o.choices)}")
    return v


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def load_config(path: str) -> FileConfig:
    """Parse and validate; ``problems`` lists everything wrong (the rest is still filled in)."""
    cfg = FileConfig(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        cfg.problems.append(f"{path}: cannot read: {exc.strerror}")
        return cfg
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        cfg.problems.append(f"{path}: not valid TOML: {exc}")
        return cfg
    ck = _Checker(path, text)
    for key in data:
        if key not in TOP_KEYS:
            ck.problem([key], f"unknown section or key (expected one of: {', '.join(sorted(TOP_KEYS))})")

    options = {o.dest: o for o in RUN_OPTIONS}
    proxy = data.get("proxy", {})
    if not isinstance(proxy, dict):
        ck.problem(["proxy"], "must be a table")
        proxy = {}
    for key, value in proxy.items():
        dest = key.replace("-", "_")
        o = options.get(dest)
        if o is None or dest in NOT_IN_PROXY:
            hint = ""
            if dest in NOT_IN_PROXY:
                hint = " (caps, rate limits, the command policy and savers have their own sections)"
            ck.problem(["proxy", key], f"unknown option{hint}")
            continue
        try:
            cfg.values[dest] = _convert(o, value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            ck.problem(["proxy", key], str(exc))
            continue
        try:
            _check_value(dest, cfg.values[dest])
        except ConfigError as exc:
            ck.problem(["proxy", key], str(exc).split(": ", 1)[-1])

    caps = data.get("caps", {})
    if not isinstance(caps, dict):
        ck.problem(["caps"], "must be a table")
        caps = {}
    for key, value in caps.items():
        if key not in CAP_KEYS:
            ck.problem(["caps", key], f"unknown key (expected one of: {', '.join(sorted(CAP_KEYS))})")
        elif key in ("daily", "monthly"):
            try:
                cfg.caps[key] = _positive_int(value)
            except ValueError as exc:
                ck.problem(["caps", key], str(exc))
        elif key == "timezone":
            try:
                ZoneInfo(str(value))
                cfg.caps[key] = str(value)
            except (ZoneInfoNotFoundError, ValueError):
                ck.problem(["caps", key], f"unknown timezone {value!r} (use an IANA name such as 'Europe/Paris')")
        elif key == "on_cap":
            if value not in ("error", "idle"):
                ck.problem(["caps", key], "must be 'error' or 'idle'")
            else:
                cfg.caps[key] = value
        elif key == "clients":
            if not isinstance(value, dict):
                ck.problem(["caps", "clients"], "must be a table of client identities")
                continue
            clients: dict[str, dict[str, int]] = {}
            for client, spec in value.items():
                if not isinstance(spec, dict):
                    ck.problem(["caps", "clients", client], "must be a table with daily and/or monthly")
                    continue
                entry: dict[str, int] = {}
                for wk, wv in spec.items():
                    if wk not in ("daily", "monthly"):
                        ck.problem(["caps", "clients", client, wk], "unknown key (expected daily or monthly)")
                        continue
                    try:
                        entry[wk] = _positive_int(wv)
                    except ValueError as exc:
                        ck.problem(["caps", "clients", client, wk], str(exc))
                clients[client] = entry
            cfg.caps["clients"] = clients

    rules = data.get("rate_limit", [])
    if isinstance(rules, dict):
        rules = [rules]
    if not isinstance(rules, list):
        ck.problem(["rate_limit"], "must be an array of tables ([[rate_limit]])")
        rules = []
    names: set[str] = set()
    for i, spec in enumerate(rules):
        if not isinstance(spec, dict):
            ck.problem(["rate_limit", i], "must be a table")
            continue
        for key in spec:
            if key not in RULE_KEYS:
                ck.problem(["rate_limit", i, key], f"unknown key (expected one of: {', '.join(sorted(RULE_KEYS))})")
        rule, rule_problems = rule_checks(spec, default_name=f"rule{i + 1}")
        for key, msg in rule_problems:
            ck.problem(["rate_limit", i, key], msg)
        if rule is None:
            continue
        if rule.name in names:
            ck.problem(["rate_limit", i, "name"], f"duplicate rule name {rule.name!r}")
        names.add(rule.name)
        cfg.rules.append(rule)

    commands = data.get("commands", {})
    if not isinstance(commands, dict):
        ck.problem(["commands"], "must be a table")
        commands = {}
    for key, value in commands.items():
        if key not in COMMANDS_KEYS:
            ck.problem(["commands", key], f"unknown key (expected one of: {', '.join(sorted(COMMANDS_KEYS))})")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            ck.problem(["commands", key], "must be a list of command names (e.g. [\"@default\", \"flushall\"])")
        else:
            problems = entry_problems(value)
            for i, msg in problems:
                ck.problem(["commands", key, i], msg, _locate_item(text, ["commands", key], i))
            if not problems:
                cfg.values["deny_commands"] = ",".join(value)

    savers = data.get("savers", {})
    if not isinstance(savers, dict):
        ck.problem(["savers"], "must be a table")
        savers = {}
    for key, value in savers.items():
        dest = SAVERS_KEYS.get(key)
        if dest is None:
            ck.problem(["savers", key], f"unknown key (expected one of: {', '.join(sorted(SAVERS_KEYS))})")
            continue
        if key == "enable" and isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                ck.problem(["savers", key], 'must be a list of saver names (e.g. ["celery"] or ["poll", "ping"])')
                continue
            value = ",".join(value)
        try:
            cfg.values[dest] = _convert(options[dest], value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            ck.problem(["savers", key], str(exc))

    for section, keys in (("state", STATE_KEYS), ("upstream", UPSTREAM_KEYS)):
        table = data.get(section, {})
        if not isinstance(table, dict):
            ck.problem([section], "must be a table")
            table = {}
        for key, value in table.items():
            dest = keys.get(key)
            if dest is None:
                ck.problem([section, key], f"unknown key (expected one of: {', '.join(sorted(keys))})")
                continue
            try:
                cfg.values[dest] = _convert(options[dest], value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                ck.problem([section, key], str(exc))
                continue
            try:
                _check_value(dest, cfg.values[dest])
            except ConfigError as exc:
                ck.problem([section, key], str(exc).split(": ", 1)[-1])

    listens = cfg.values.get("listen") or []
    try:
        open_listens = [x for x in listens if not parse_listen(x).is_loopback]
    except ConfigError:
        open_listens = []
    if open_listens and "users" not in data and not cfg.values.get("users") and not cfg.values.get("allow_unauthenticated"):
        ck.problem(["proxy", "listen"], f"listening on {', '.join(open_listens)} needs client authentication "
                   "([users] or users = FILE) or allow_unauthenticated = true")

    if "users" in data:
        users, user_problems = users_problems({"users": data["users"]})
        for keys, msg in user_problems:
            ck.problem(["users", *keys], msg)
        cfg.users = users
    cfg.problems.extend(text for _, text in sorted(ck.problems, key=lambda p: p[0]))  # in the file's order
    return cfg


def _check_value(dest: str, value: Any) -> None:
    """The checks `run` makes on an option's value, for check-config (raises ConfigError)."""
    if dest == "upstream":
        parse_upstream(value)
    elif dest == "state_url":
        check_state_url(value)
    elif dest == "listen":
        for x in value:
            parse_listen(x)
    elif dest == "admin":
        parse_hostport(value, "--admin")
    elif dest in ("upstream_password_file", "admin_token_file", "users", "upstream_ca", "upstream_cert", "upstream_key", "tls_cert", "tls_key"):
        import os

        if not os.path.isfile(value):
            raise ConfigError(f"--{dest.replace('_', '-')}: no such file: {value}")


def rule_checks(spec: dict[str, Any], default_name: str) -> tuple[RateRule | None, list[tuple[str, str]]]:
    """A rate-limit rule from its table, and every problem in it as (key, message); the rule is None
    when there is any."""
    problems: list[tuple[str, str]] = []
    name = spec.get("name", default_name)
    if not isinstance(name, str) or not name or not re.match(r"^[A-Za-z0-9_.:-]+$", name):
        problems.append(("name", "must be a short name of letters, digits, '_', '-', '.' or ':'"))
    rate = None
    if "rate" not in spec:
        problems.append(("rate", "is required (e.g. '10/s', '600/min')"))
    else:
        try:
            rate = parse_rate(spec["rate"])
        except LimitsConfigError as exc:
            problems.append(("rate", str(exc)))
    burst = spec.get("burst", 1)
    if isinstance(burst, bool) or not isinstance(burst, (int, float)) or burst < 1:
        problems.append(("burst", "must be a number >= 1"))
    action = spec.get("action", "delay")
    if action not in ("delay", "reject"):
        problems.append(("action", "must be 'delay' or 'reject'"))
    max_queue = spec.get("max_queue", 1000)
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        problems.append(("max_queue", "must be a positive whole number"))
    client = spec.get("client", "*")
    command = spec.get("command", "*")
    if not isinstance(client, str):
        problems.append(("client", "must be a glob string"))
    if not isinstance(command, str):
        problems.append(("command", "must be a glob string"))
    if problems or rate is None:
        return None, problems
    return RateRule(name, rate, float(burst), client, command.lower(), action, max_queue), []


def rule_from_dict(spec: dict[str, Any], default_name: str) -> RateRule:
    """A rate-limit rule; LimitsConfigError ("key: message") names the first problem."""
    rule, problems = rule_checks(spec, default_name)
    if rule is None:
        key, msg = problems[0]
        raise LimitsConfigError(f"{key}: {msg}")
    return rule


def parse_rate_limit_flag(text: str) -> RateRule:
    """``name=x,rate=6/min,burst=1,client=celery,command=brpop,action=delay,max_queue=100``"""
    spec: dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in RULE_KEYS:
            raise LimitsConfigError(f"--rate-limit {text!r}: expected key=value pairs of {', '.join(sorted(RULE_KEYS))}")
        v = v.strip()
        if k in ("burst",):
            try:
                spec[k] = float(v)
            except ValueError:
                raise LimitsConfigError(f"--rate-limit {text!r}: burst must be a number") from None
        elif k == "max_queue":
            try:
                spec[k] = int(v)
            except ValueError:
                raise LimitsConfigError(f"--rate-limit {text!r}: max_queue must be a whole number") from None
        else:
            spec[k] = v
    try:
        return rule_from_dict(spec, default_name=spec.get("command", "rule").replace("*", "any"))
    except LimitsConfigError as exc:
        raise LimitsConfigError(f"--rate-limit {text!r}: {exc}") from None


def parse_client_cap_flag(text: str) -> tuple[str, str, int]:
    """``celery:daily=5000`` -> ("celery", "daily", 5000)"""
    ident, colon, rest = text.rpartition(":")
    window, eq, n = rest.partition("=")
    if not colon or not ident or not eq or window not in ("daily", "monthly"):
        raise LimitsConfigError(f"--client-cap {text!r}: expected IDENTITY:daily=N or IDENTITY:monthly=N")
    try:
        value = int(n)
    except ValueError:
        raise LimitsConfigError(f"--client-cap {text!r}: N must be a whole number") from None
    if value <= 0:
        raise LimitsConfigError(f"--client-cap {text!r}: N must be positive")
    return ident, window, value


# [caps] keys that are also run options (the file is a layer below flags and env vars)
CAP_OPTIONS = {"daily": "daily_cap", "monthly": "monthly_cap", "timezone": "cap_timezone", "on_cap": "on_cap"}


def file_layer(cfg: FileConfig) -> dict[str, Any]:
    values = dict(cfg.values)
    for key, dest in CAP_OPTIONS.items():
        if key in cfg.caps:
            values[dest] = cfg.caps[key]
    return values


def build_caps(opts: dict[str, Any], file_caps: dict[str, Any]) -> CapConfig:
    """Caps from the resolved options, plus per-client caps from the file and --client-cap."""
    clients = {k: dict(v) for k, v in file_caps.get("clients", {}).items()}
    for text in opts.get("client_cap") or []:
        ident, window, value = parse_client_cap_flag(text)
        clients.setdefault(ident, {})[window] = value
    tz = opts.get("cap_timezone") or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise LimitsConfigError(f"--cap-timezone: unknown timezone {tz!r}") from None
    return CapConfig(
        daily=opts.get("daily_cap"),
        monthly=opts.get("monthly_cap"),
        clients=clients,
        timezone=tz,
        on_cap=opts.get("on_cap") or "error",
    )
