"""Command line: ``respmeter run`` and friends.

Every ``run`` flag can also be given as an environment variable: ``--foo-bar`` is ``RESPMETER_FOO_BAR``
(repeatable flags take a comma-separated list), and in the config file. Flags win over the
environment, which wins over the config file (--config), which wins over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from . import assemble
from .config import ConfigError, Listen, check_state_url, parse_hostport, parse_listen, parse_upstream
from .options import ENV_PREFIX, RUN_OPTIONS, Option, _bool, _size, keepalive_tuple  # noqa: F401
from .resp import hot_path


def _shown_default(o: Option) -> str:
    if o.shown_default is not None:
        return o.shown_default()
    d = o.default
    if o.multiple:
        return ",".join(d) if d else "none"
    if o.boolean:
        return "off"
    if d is None:
        return "none"
    if o.type is _size:
        for unit, m in (("gb", 1024**3), ("mb", 1024**2), ("kb", 1024)):
            if d % m == 0:
                return f"{d // m}{unit}"
    if isinstance(d, bool):
        return "true" if d else "false"
    return str(d)


def _add_options(p: argparse.ArgumentParser, options: list[Option]) -> None:
    for o in options:
        kw: dict[str, Any] = {"dest": o.dest, "default": None}
        help_text = f"{o.help} [env {o.env}; default {_shown_default(o)}]"
        if o.boolean:
            p.add_argument(o.flag, action="store_const", const=True, help=help_text, **kw)
            continue
        kw.update(type=o.type, help=help_text, metavar=o.metavar)
        if o.choices:
            kw["choices"] = o.choices
        if o.multiple:
            kw["action"] = "append"
        p.add_argument(o.flag, **kw)


def resolve(
    options: list[Option],
    ns: argparse.Namespace,
    env: dict[str, str],
    parser: argparse.ArgumentParser,
    file_values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Flag, then environment variable, then config file, then default."""
    out: dict[str, Any] = {}
    file_values = file_values or {}
    for o in options:
        v = getattr(ns, o.dest, None)
        if v is None and o.env in env:
            raw = env[o.env]
            try:
                if o.boolean:
                    v = _bool(raw)
                elif o.multiple:
                    v = [o.type(x.strip()) for x in raw.split(o.sep) if x.strip()]
                else:
                    v = o.type(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                shown = "(hidden)" if o.secret else repr(raw)
                parser.error(f"{o.env}={shown}: {exc}")
            if o.choices and v not in o.choices:
                parser.error(f"{o.env}: must be one of {', '.join(o.choices)}")
        if v is None:
            v = file_values.get(o.dest)
        out[o.dest] = o.default if v is None else v
    return out


RUN_DESCRIPTION = (
    "Run the proxy. Every flag below is also an environment variable: --foo-bar is RESPMETER_FOO_BAR "
    "(a repeatable flag's variable takes a comma-separated list; --rate-limit's a ';'-separated one), and "
    "a setting of the config file (--config; see the README: [proxy] foo_bar, but the caps, rate limits, "
    "command policy and savers have their own sections, e.g. --saver-hold is [savers] hold). A flag wins "
    "over the environment, which wins over the config file, which wins over the default."
)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. It reports its own unrecognized arguments, with its own usage
    (``usage: respmeter run ...``), where argparse would leave them to the top-level parser."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="respmeter",
        description="A Redis-protocol proxy that counts every command, exports Prometheus metrics "
        "and protects per-command-billed Redis plans.",
    )
    p.add_argument("--version", action="version", version=f"respmeter {__version__} (hot path: {hot_path()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    run = sub.add_parser("run", help="run the proxy", description=RUN_DESCRIPTION)
    _add_options(run, RUN_OPTIONS)
    hp = sub.add_parser(
        "hash-password",
        help="hash a password for the users file",
        description="Read a password (prompted, or one line from standard input) and print the "
        "password_hash to put in a --users file.",
    )
    hp.add_argument("--stdin", action="store_true", help="read the password from standard input")
    cc = sub.add_parser("check-config", help="validate a config file", description="Check a TOML config "
                        "file and print every problem with its place. Exit status 1 if there is any.")
    cc.add_argument("file", metavar="FILE", help="the TOML config file to check (the one --config takes)")
    us = sub.add_parser("usage", help="today's and this month's usage against the caps",
                        description="Print today's and this month's billable usage, per client and per command, "
                        "with caps, remaining budget and a projection. Reads a running proxy's admin API, or "
                        "with --state-dir the state of a stopped one.")
    _add_source_args(us)
    rp = sub.add_parser("report", help="what sends all these commands, and why",
                        description="Break the traffic down by command and key pattern, name its sources "
                        "(Celery, kombu, redis-py, ...) and the settings that cut it. Reads a running proxy's "
                        "admin API, or with --state-dir the state of a stopped one (today's counts).")
    _add_source_args(rp)
    rp.add_argument("--window", default=None, help="measure over this much recent traffic (live proxy): "
                    "90s, 10m, 2h, 1d [default 10m]; this proxy's own traffic, even with --state-url")
    scope = rp.add_mutually_exclusive_group()
    scope.add_argument("--fleet", action="store_const", const="fleet", dest="scope",
                       help="today's traffic of every proxy sharing the running proxy's --state-url, per instance "
                       "[the default for such a proxy, unless --window is given]")
    scope.add_argument("--local", action="store_const", const="local", dest="scope",
                       help="only the running proxy's own live traffic")
    rp.add_argument("--rows", type=int, default=25, help="table rows to print [default 25]")
    tp = sub.add_parser("top", help="live view of commands/s, usage and rejections",
                        description="A live terminal view refreshed every second: commands/s by command and by "
                        "client, today's usage against the cap, rejected and throttled counts. q or Ctrl-C quits.")
    tp.add_argument("--admin", default=os.environ.get("RESPMETER_ADMIN", "127.0.0.1:9380"),
                    help="admin endpoint of the running proxy [env RESPMETER_ADMIN; default 127.0.0.1:9380]")
    tp.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds [default 1]")
    tp.add_argument("--once", action="store_true", help="print one frame (after one interval) and exit")
    return p


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=os.environ.get("RESPMETER_ADMIN", "127.0.0.1:9380"),
                   help="admin endpoint of the running proxy [env RESPMETER_ADMIN; default 127.0.0.1:9380]")
    p.add_argument("--state-dir", default=None, help="read this state directory instead of a running proxy")
    p.add_argument("--config", default=os.environ.get("RESPMETER_CONFIG"),
                   help="config file, for caps and timezone when reading --state-dir")
    p.add_argument("--daily-cap", type=int, default=None, help="with --state-dir: the daily cap to report against")
    p.add_argument("--monthly-cap", type=int, default=None, help="with --state-dir: the monthly cap to report against")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "run":
        env = dict(os.environ)
        config_path = ns.config or env.get("RESPMETER_CONFIG")
        file_cfg = None
        file_values: dict[str, Any] = {}
        if config_path:
            from .configfile import file_layer, load_config

            file_cfg = load_config(config_path)
            if file_cfg.problems:
                for problem in file_cfg.problems:
                    print(f"respmeter: {problem}", file=sys.stderr)
                return 2
            file_values = file_layer(file_cfg)
        opts = resolve(RUN_OPTIONS, ns, env, parser, file_values)
        return run(opts, parser, file_cfg)
    if ns.command == "check-config":
        return check_config_command(ns.file)
    if ns.command == "usage":
        return usage_command(ns)
    if ns.command == "report":
        return report_command(ns)
    if ns.command == "top":
        from .top import top_command

        return top_command(ns)
    if ns.command == "hash-password":
        return hash_password_command(ns.stdin)
    parser.error(f"unknown command {ns.command}")
    return 2


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d' or plain seconds -> seconds."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        v = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h, 1d)") from None
    if v <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return v


def hash_password_command(from_stdin: bool) -> int:
    from .auth import hash_password

    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("respmeter: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("respmeter: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


class SecretFilter(logging.Filter):
    """Defence in depth: masks known secrets in every log line, whatever code logged them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [x for x in secrets if x]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            masked = msg
            for x in self.secrets:
                masked = masked.replace(x, "****")
            if masked != msg:
                record.msg, record.args = masked, None
        return True


def check_config_command(path: str) -> int:
    from .configfile import load_config

    cfg = load_config(path)
    if cfg.problems:
        for problem in cfg.problems:
            print(problem)
        print(f"{len(cfg.problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(cfg.values)} option(s), {len(cfg.rules)} rate limit(s), {len(cfg.users)} user(s))")
    return 0


def fetch_json(admin: str, path: str) -> Any:
    import json
    import urllib.request

    host, port = parse_hostport(admin, "--admin")
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}{path}"
    from .admin import client_headers

    import urllib.error

    req = urllib.request.Request(url, headers=client_headers())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - the admin endpoint
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            return body  # (the endpoint's own words: the caller says them)
        raise


def offline_limits(ns: argparse.Namespace) -> Any:
    """A read-only Limits over a stopped proxy's state directory."""
    from .configfile import build_caps, file_layer, load_config
    from .limits import Limits
    from .store import Store

    values: dict[str, Any] = {}
    file_caps: dict[str, Any] = {}
    if ns.config:
        cfg = load_config(ns.config)
        if cfg.problems:
            raise ConfigError("; ".join(cfg.problems))
        values = file_layer(cfg)
        file_caps = cfg.caps
    opts = {o.dest: values.get(o.dest, o.default) for o in RUN_OPTIONS}
    for cap in ("daily_cap", "monthly_cap"):
        if getattr(ns, cap, None):
            opts[cap] = getattr(ns, cap)
    import pathlib

    if not (pathlib.Path(ns.state_dir) / "usage.sqlite3").exists():
        raise ConfigError(f"--state-dir {ns.state_dir}: no usage state there")
    return Limits(build_caps(opts, file_caps), [], Store(ns.state_dir, owner="reader"))


def usage_command(ns: argparse.Namespace) -> int:
    import json

    try:
        if ns.state_dir:
            snap = offline_limits(ns).snapshot_readonly()
        else:
            snap = fetch_json(ns.admin, "/api/usage")
    except ConfigError as exc:
        print(f"respmeter: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .admin import unreachable

        print(f"respmeter: {unreachable(ns.admin, exc)}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(snap, indent=1, sort_keys=True))
        return 0
    from .report import format_usage

    print(format_usage(snap))
    return 0


def report_command(ns: argparse.Namespace) -> int:
    import json
    import urllib.parse

    from .explain import build_report, stored_traffic
    from .report import format_report

    try:
        window = parse_duration(ns.window or "10m")
        if ns.state_dir and ns.scope == "fleet":
            raise ConfigError("--fleet reads a running proxy's shared state store: use --admin, not --state-dir")
        if ns.state_dir:
            limits = offline_limits(ns)
            usage = limits.snapshot_readonly()
            traffic = stored_traffic(limits.store, limits)
        else:
            scope = ns.scope or ("local" if ns.window else "auto")
            traffic = fetch_json(ns.admin, "/api/traffic?" + urllib.parse.urlencode({"window": window, "scope": scope}))
            if "error" in traffic:
                raise ConfigError(traffic["error"])
            usage = fetch_json(ns.admin, "/api/usage")
    except (ConfigError, ValueError) as exc:
        print(f"respmeter: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .admin import unreachable

        print(f"respmeter: {unreachable(ns.admin, exc)}", file=sys.stderr)
        return 1
    rep = build_report(traffic, usage)
    if ns.json:
        print(json.dumps(rep, indent=1, sort_keys=True))
    else:
        print(format_report(rep, ns.rows), end="")
    return 0


def run(opts: dict[str, Any], parser: argparse.ArgumentParser, file_cfg: Any = None) -> int:
    from .loops import loop_factory

    logging.basicConfig(
        level=getattr(logging, opts["log_level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        listens = [parse_listen(x) for x in opts["listen"]]
        upstream = parse_upstream(opts["upstream"])
        check_state_url(opts["state_url"])
        admin_host, admin_port = parse_hostport(opts["admin"], "--admin")
        upstream = with_password(upstream, opts, dict(os.environ))
        admin_token = read_admin_token(opts)
        check_safety(opts, listens, upstream)
    except ConfigError as exc:
        print(f"respmeter: {exc}", file=sys.stderr)
        return 2
    secret_filter = SecretFilter([upstream.password or "", admin_token or ""])
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    try:
        from .configfile import build_caps, parse_rate_limit_flag
        from .limits import LimitsConfigError

        caps = build_caps(opts, file_cfg.caps if file_cfg else {})
        rules = [parse_rate_limit_flag(x) for x in opts["rate_limit"]] if opts["rate_limit"] else (
            file_cfg.rules if file_cfg else [])
    except LimitsConfigError as exc:
        print(f"respmeter: {exc}", file=sys.stderr)
        return 2
    factory, loop_name = loop_factory(opts["loop"])
    app = App(opts, listens, upstream, (admin_host, admin_port), loop_name)
    app.caps, app.rules = caps, rules
    app.file_users = file_cfg.users if file_cfg else {}
    app.admin_token = admin_token
    from .commandpolicy import CommandPolicy

    app.command_policy = CommandPolicy.from_spec(opts["deny_commands"])  # checked when the options were read
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(app.main())


def with_password(upstream: Any, opts: dict[str, Any], env: dict[str, str]) -> Any:
    """The upstream with its password from the URL, RESPMETER_UPSTREAM_PASSWORD or the password file."""
    password = upstream.password
    sources = [n for n, present in (("the URL", password is not None),
                                    ("RESPMETER_UPSTREAM_PASSWORD", bool(env.get("RESPMETER_UPSTREAM_PASSWORD"))),
                                    ("--upstream-password-file", opts["upstream_password_file"] is not None)) if present]
    if len(sources) > 1:
        raise ConfigError("upstream password given more than once: " + " and ".join(sources))
    if env.get("RESPMETER_UPSTREAM_PASSWORD"):  # empty means unset (compose's ${VAR:-})
        password = env["RESPMETER_UPSTREAM_PASSWORD"]
    elif opts["upstream_password_file"]:
        path = opts["upstream_password_file"]
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--upstream-password-file {path}: {exc.strerror}") from None
        if not password:
            raise ConfigError(f"--upstream-password-file {path}: the file is empty")
    return dataclasses.replace(upstream, password=password)


def read_admin_token(opts: dict[str, Any]) -> str | None:
    """The admin token from --admin-token (RESPMETER_ADMIN_TOKEN) or --admin-token-file; None when
    neither is set (an empty value counts as unset). Never part of an error message."""
    token, path = opts["admin_token"] or None, opts["admin_token_file"] or None
    if token and path:
        raise ConfigError("admin token given twice: --admin-token (RESPMETER_ADMIN_TOKEN) and --admin-token-file")
    where = "--admin-token"
    if path:
        where = f"--admin-token-file {path}"
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: {getattr(exc, 'strerror', None) or 'not readable as UTF-8 text'}") from None
        if not token:
            raise ConfigError(f"{where}: the file is empty")
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise ConfigError(f"{where}: the token must be printable ASCII without spaces (it goes in an HTTP header)")
    return token


def check_safety(opts: dict[str, Any], listens: list[Listen], upstream: Any) -> None:
    tls_opts = [f for f in ("upstream_ca", "upstream_cert", "upstream_key") if opts[f]]
    if (tls_opts or opts["upstream_tls_insecure"]) and not upstream.tls:
        raise ConfigError("--upstream-ca/--upstream-cert/--upstream-key/--upstream-tls-insecure need a rediss:// upstream")
    if bool(opts["upstream_cert"]) != bool(opts["upstream_key"]):
        raise ConfigError("--upstream-cert and --upstream-key go together")
    if bool(opts["tls_cert"]) != bool(opts["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    open_listens = [str(x) for x in listens if not x.is_loopback]
    if open_listens and not opts["users"] and not opts["allow_unauthenticated"]:
        raise ConfigError(
            f"refusing to listen on {', '.join(open_listens)} without client authentication: anyone who "
            "can reach it could use your Redis (and your quota). Configure proxy users with --users FILE, "
            "listen on a loopback address, or pass --allow-unauthenticated if a firewall or private "
            "network protects it."
        )
    admin_host, _ = parse_hostport(opts["admin"], "--admin")
    admin_open = not Listen(None, host=admin_host).is_loopback
    if admin_open and not (opts["admin_token"] or opts["admin_token_file"]) and not opts["allow_unauthenticated_admin"]:
        raise ConfigError(
            f"refusing to serve the admin endpoint on {opts['admin']} without a token: anyone who can reach "
            "it could read your metrics, usage and key patterns. Set --admin-token-file FILE (or "
            "--admin-token / RESPMETER_ADMIN_TOKEN; clients then send 'Authorization: Bearer TOKEN'), "
            "bind --admin to a loopback address, or pass --allow-unauthenticated-admin if a firewall or "
            "private network protects it."
        )


def upstream_ssl_context(opts: dict[str, Any]) -> Any:
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=opts["upstream_ca"])
        if opts["upstream_cert"]:
            ctx.load_cert_chain(opts["upstream_cert"], opts["upstream_key"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"upstream TLS settings: {exc}") from None
    if opts["upstream_tls_insecure"]:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        logging.getLogger("respmeter").warning(
            "!!! --upstream-tls-insecure: the upstream's certificate is NOT verified; anyone on the "
            "path can read your traffic and credentials. Use this for development only. !!!"
        )
    return ctx


def downstream_ssl_context(opts: dict[str, Any]) -> Any:
    import ssl

    if not opts["tls_cert"]:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(opts["tls_cert"], opts["tls_key"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None
    return ctx


def os_reason(exc: OSError) -> str:
    """The operating system's reason alone ('Address already in use'), without asyncio's wording."""
    import socket

    if not isinstance(exc, socket.gaierror) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


class App:
    """Wires the proxy, the admin endpoint and signal handling together for ``respmeter run``."""

    def __init__(self, opts: dict[str, Any], listens: list[Listen], upstream: Any, admin: tuple[str, int], loop_name: str) -> None:
        self.opts = opts
        self.listens = listens
        self.upstream = upstream
        self.admin_addr = admin
        self.loop_name = loop_name
        self.log = logging.getLogger("respmeter")
        self.caps: Any = None
        self.rules: list = []
        self.file_users: dict = {}
        self.admin_token: str | None = None
        self.command_policy: Any = None
        self.limits: Any = None

    @staticmethod
    def _offload(fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn`` in a worker thread; call ``done(result)`` back on the event loop."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, fn)
        fut.add_done_callback(lambda f: done(f.result() if not f.exception() else False))

    def _admin_warnings(self) -> None:
        host, port = self.admin_addr
        if self.admin_token is not None:
            self.log.info("the admin endpoint requires its token on every path but /healthz")
            if len(self.admin_token) < 16:
                self.log.warning("the admin token is short (%d characters): use 32 random ones, e.g. from "
                                 "`openssl rand -hex 32`", len(self.admin_token))
        elif not Listen(None, host=host).is_loopback:
            self.log.warning(
                "the admin endpoint %s:%d has no token (--allow-unauthenticated-admin): anyone who can "
                "reach it reads the metrics, usage and key patterns", host, port)

    async def _start_listeners(self, proxy: Any, admin: Any) -> bool:
        """Bind every --listen, then the admin endpoint; on failure log which one, its address and the
        OS's reason, close what was bound and return False."""
        try:
            await proxy.start()
        except OSError as exc:
            bound = len(proxy.servers)  # Proxy.start binds the listens in order, keeping each server
            failed = f"--listen {self.listens[bound]}" if bound < len(self.listens) else "--listen"
            self.log.error("cannot listen for clients on %s: %s", failed, os_reason(exc))
            await proxy.shutdown(0)
            return False
        host, port = self.admin_addr
        try:
            await admin.start(host, port)
        except OSError as exc:
            self.log.error("cannot listen for the admin endpoint on --admin %s: %s",
                           Listen(None, host=host, port=port), os_reason(exc))
            await proxy.shutdown(0)
            return False
        return True

    def _log_startup(self, state_dir: str) -> None:
        """What this process is doing, in two lines (the upstream's password masked)."""
        self.log.info("respmeter %s proxying to %s (loop: %s, hot path: %s), state directory %s",
                      __version__, self.upstream.masked(), self.loop_name, hot_path(), state_dir)
        from .limits import CapConfig

        caps = self.caps or CapConfig()
        per_client = ", ".join(f"{ident} " + " ".join(f"{w}={n}" for w, n in sorted(windows.items()))
                               for ident, windows in sorted(caps.clients.items()) if windows)
        self.log.info("caps: daily %s, monthly %s, per client %s; timezone %s; on_cap %s", caps.daily or "none",
                      caps.monthly or "none", per_client or "none", caps.timezone, caps.on_cap)

    async def main(self) -> int:
        from prometheus_client import CollectorRegistry

        from .admin import AdminServer
        from .health import Health
        from .metrics import HealthCollector, LimitsCollector, Stats, StatsCollector
        from .server import Proxy, ProxySettings, probe_upstream

        opts = self.opts
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        settings = ProxySettings(
            upstream,
            connect_timeout=opts["connect_timeout"],
            max_bulk=opts["max_bulk"],
            max_query=opts["max_query_buffer"],
            max_clients=opts["max_clients"],
            upstream_timeout=opts["upstream_timeout"],
            keepalive=keepalive_tuple(opts["upstream_keepalive"]),
        )
        from .server import fd_headroom

        fd_headroom(opts["max_clients"], self.log)
        try:
            if upstream.tls:
                settings.ssl_context = upstream_ssl_context(opts)
            settings.downstream_ssl = downstream_ssl_context(opts)
            verifier = None
            from .auth import AuthConfigError, Verifier, load_users_file

            if opts["users"]:
                try:
                    verifier = Verifier(load_users_file(opts["users"]), self._offload)
                except AuthConfigError as exc:
                    raise ConfigError(str(exc)) from None
            elif self.file_users:
                verifier = Verifier(self.file_users, self._offload)
            # nothing a client sends before AUTH costs an upstream connection
            settings.lazy_upstream = verifier is not None
        except ConfigError as exc:
            self.log.error("%s", exc)
            return 2

        stats = Stats(opts["client_label_limit"])
        registry = CollectorRegistry()
        registry.register(StatsCollector(stats))
        health = Health(lambda: probe_upstream(settings))
        health.traffic = lambda: stats.bytes["from_upstream"]
        stats.on_quota = health.quota_exceeded

        def upstream_broken(reason: str) -> None:
            if reason != health.broken_reason:
                self.log.warning("%s", reason)
            health.broken(reason)

        stats.on_upstream_broken = upstream_broken
        stats.on_upstream_reply = health.replied
        registry.register(HealthCollector(health))

        from .auth import UpstreamAuth
        from .gate import Gate

        def upstream_auth_error(text: str) -> None:
            stats.upstream_error("auth")
            health.auth_failed(f"upstream rejected the proxy's credentials: {text}")
            self.log.error("upstream rejected the proxy's credentials: %s", text)

        def upstream_rejected(text: str) -> None:
            stats.upstream_error("rejected")
            health.broken(f"the server refused the connection: {text}")
            self.log.warning("upstream refused a connection: %s", text)

        stats.on_upstream_refused = upstream_rejected

        from .limits import Limits
        from .store import Store, default_state_dir

        state_dir = opts["state_dir"] or str(default_state_dir())
        try:
            store = Store(state_dir)
        except Exception as exc:  # noqa: BLE001 - OSError, sqlite3.Error: say why and stop
            self.log.error("state directory %s: %s", state_dir, exc)
            return 2
        if opts["state_url"]:
            try:
                store = assemble.shared_store(opts, store, stats, upstream, upstream_ssl_context, self.log)
            except ConfigError as exc:
                self.log.error("%s", exc)
                return 2
        if getattr(store, "healthy", None) is not None:
            health.state_problem = assemble.state_problem(store, opts["state_fail"])
        if opts["track_patterns"]:
            from .patterns import PatternTracker

            stats.patterns = PatternTracker(opts["pattern_limit"])
        from .handshake import HandshakeBook

        book = HandshakeBook()
        limits = Limits(self.caps, self.rules, store, call_later=lambda d, fn: loop.call_later(d, fn), stats=stats,
                        handshake=book, fail_closed=opts["state_fail"] == "closed")
        self.limits = limits
        savers = assemble.savers(opts, settings, stats, book, limits, upstream, loop, self.log)
        gate = Gate(
            savers=savers,
            handshake=book,
            verifier=verifier,
            upstream_auth=UpstreamAuth(upstream.username, upstream.password, upstream.db),
            limits=limits,
            call_later=lambda delay, fn: loop.call_later(delay, fn),
            on_upstream_auth_error=upstream_auth_error,
            on_upstream_rejected=upstream_rejected,
            on_upstream_auth_ok=health.auth_ok,
            commands=self.command_policy,
        )
        settings.policy = gate
        if opts["upstream_pool"]:
            settings.pool = assemble.pool(opts["upstream_pool"], settings, stats, health, book, gate, limits, loop)
            self.log.info("upstream pool: %d shared connection(s) per protocol (--upstream-pool)", opts["upstream_pool"])
        if savers is not None:
            self.log.info("savers: %s", savers.config.describe())
        if self.command_policy is not None:
            self.log.info("command policy (--deny-commands): %s", self.command_policy.describe())
        registry.register(LimitsCollector(limits))
        proxy = Proxy(settings, self.listens, stats, health)
        proxy.on_stall = health.broken
        admin = AdminServer(registry, health, token=self.admin_token)
        self._admin_warnings()
        from .admin import json_response

        async def api_usage(query: dict[str, list[str]]) -> Any:
            return json_response(limits.snapshot())

        admin.add_route("/api/usage", api_usage)

        async def api_patterns(query: dict[str, list[str]]) -> Any:
            from .explain import fleet_traffic, live_traffic
            from .store import StateUnavailable

            try:
                window = parse_duration(query.get("window", ["10m"])[0])
            except ValueError as exc:
                return json_response({"error": str(exc)}, 400)
            scope = query.get("scope", ["auto"])[0]
            shared = hasattr(limits.store, "fleet_traffic")
            if scope not in ("auto", "fleet", "local"):
                return json_response({"error": f"scope: {scope!r} is not auto, fleet or local"}, 400)
            if scope == "fleet" and not shared:
                return json_response({"error": "this proxy has no --state-url: there is no fleet to report"}, 400)
            if shared and scope != "local":
                try:
                    limits.flush()  # (this proxy's latest counts go with the same call)
                    return json_response(fleet_traffic(limits.store, limits))
                except StateUnavailable as exc:
                    return json_response({"error": f"the fleet's traffic cannot be read: {exc}"}, 503)
            return json_response(live_traffic(stats, limits, window, savers=savers.enabled if savers is not None else (),
                                              pool=opts["upstream_pool"]))

        admin.add_route("/api/traffic", api_patterns)
        if not await self._start_listeners(proxy, admin):
            return 1
        self._log_startup(state_dir)
        if hot_path() != "C" and os.environ.get("RESPMETER_PURE_PYTHON", "") in ("", "0"):
            self.log.warning(
                "the C hot path (proxy._speedups) is not built: counting is exact, but pipelined "
                "throughput is about half; install a C compiler and Python headers, then reinstall"
            )
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                self.log.info("%s: shutting down gracefully", signal.Signals(signum).name)
                stop.set()
            else:
                self.log.warning("second signal: exiting now")
                os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        async def flusher() -> None:
            while True:
                await asyncio.sleep(1.0)
                try:
                    limits.flush()
                except Exception:  # noqa: BLE001 - a busy/locked state file must not stop the proxy
                    self.log.exception("could not write usage state")
                if health.stale() or (health.failing() and not health.sticky()):
                    # keep respmeter_upstream_up current while idle (a bare connect, no command)
                    await health.check()

        flush_task = loop.create_task(flusher())
        await stop.wait()
        await admin.close()
        if savers is not None:
            savers.shutdown()  # what the savers hold upstream goes back first
        await proxy.shutdown(opts["shutdown_timeout"])
        if savers is not None and savers.control is not None:
            savers.control.close()
        flush_task.cancel()
        limits.close()
        store.close()
        self.log.info("stopped")
        return 0
