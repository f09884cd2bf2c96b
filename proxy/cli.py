"""Command line: ``respmeter run`` and friends.

Every ``run`` flag can also be given as an environment variable: ``--foo-bar`` is ``RESPMETER_FOO_BAR``
(repeatable flags take a comma-separated list). Flags win over the environment, which wins over the
defaults.
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
from .config import ConfigError, Listen, parse_hostport, parse_listen, parse_upstream

ENV_PREFIX = "RESPMETER_"


def _size(text: str) -> int:
    """A byte size: 512mb, 1gb, 65536."""
    t = text.strip().lower().replace("_", "")
    mult = 1
    for suffix, m in (("kb", 1024), ("mb", 1024**2), ("gb", 1024**3), ("k", 1024), ("m", 1024**2), ("g", 1024**3), ("b", 1)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512mb)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    multiple: bool = False
    boolean: bool = False  # a switch: --flag sets True; the env var takes true/false
    choices: Sequence[str] | None = None
    metavar: str | None = None
    secret: bool = False  # never echoed

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


RUN_OPTIONS: list[Option] = [
    Option("--listen", ["127.0.0.1:6380"], "where clients connect: HOST:PORT or a unix socket path, "
           "optionally named (celery=127.0.0.1:6380); repeatable", multiple=True, metavar="[NAME=]ADDR"),
    Option("--upstream", "redis://127.0.0.1:6379", "the Redis server: redis://, rediss:// or unix:// URL",
           metavar="URL", secret=True),
    Option("--admin", "127.0.0.1:9380", "admin HTTP endpoint (/metrics, /healthz)", metavar="HOST:PORT"),
    Option("--log-level", "info", "logging level", choices=("debug", "info", "warning", "error")),
    Option("--loop", "auto", "event loop: uvloop when installed (auto), or force one",
           choices=("auto", "uvloop", "asyncio")),
    Option("--connect-timeout", 5.0, "seconds to wait for an upstream connection", type=_positive_float,
           metavar="SECONDS"),
    Option("--shutdown-timeout", 10.0, "on SIGTERM/SIGINT, seconds to let replies in flight arrive",
           type=_positive_float, metavar="SECONDS"),
    Option("--max-bulk", 512 * 1024**2, "largest bulk string a client may send (Redis: proto-max-bulk-len)",
           type=_size, metavar="SIZE"),
    Option("--max-query-buffer", 1024**3, "largest incomplete request a client may hold "
           "(Redis: client-query-buffer-limit)", type=_size, metavar="SIZE"),
    Option("--client-label-limit", 100, "distinct client names kept as metric labels; the rest are 'other'",
           type=_positive_int, metavar="N"),
    # upstream TLS and credentials
    Option("--upstream-ca", None, "verify a rediss:// upstream against this CA file instead of the system store",
           metavar="FILE"),
    Option("--upstream-cert", None, "client certificate for a rediss:// upstream that asks for one", metavar="FILE"),
    Option("--upstream-key", None, "private key of --upstream-cert", metavar="FILE"),
    Option("--upstream-tls-insecure", False, "do not verify the upstream's certificate (development only)",
           boolean=True),
    Option("--upstream-password-file", None, "file holding the upstream password (instead of putting it in the "
           "URL; RESPMETER_UPSTREAM_PASSWORD also works)", metavar="FILE"),
    # clients
    Option("--users", None, "TOML file of proxy users ([users.NAME] password_hash, label); clients must then "
           "AUTH", metavar="FILE"),
    Option("--allow-unauthenticated", False, "allow listening beyond loopback without --users", boolean=True),
    Option("--tls-cert", None, "serve clients over TLS with this certificate", metavar="FILE"),
    Option("--tls-key", None, "private key of --tls-cert", metavar="FILE"),
]


def _add_options(p: argparse.ArgumentParser, options: list[Option]) -> None:
    for o in options:
        kw: dict[str, Any] = {"dest": o.dest, "default": None}
        default_text = ",".join(o.default) if o.multiple else o.default
        help_text = f"{o.help} [env {o.env}; default {default_text}]"
        if o.boolean:
            p.add_argument(o.flag, action="store_const", const=True, help=help_text, **kw)
            continue
        kw.update(type=o.type, help=help_text, metavar=o.metavar)
        if o.choices:
            kw["choices"] = o.choices
        if o.multiple:
            kw["action"] = "append"
        p.add_argument(o.flag, **kw)


def resolve(options: list[Option], ns: argparse.Namespace, env: dict[str, str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flag, then environment variable, then default."""
    out: dict[str, Any] = {}
    for o in options:
        v = getattr(ns, o.dest, None)
        if v is None and o.env in env:
            raw = env[o.env]
            try:
                if o.boolean:
                    v = _bool(raw)
                elif o.multiple:
                    v = [o.type(x) for x in raw.split(",") if x.strip()]
                else:
                    v = o.type(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                shown = "(hidden)" if o.secret else repr(raw)
                parser.error(f"{o.env}={shown}: {exc}")
            if o.choices and v not in o.choices:
                parser.error(f"{o.env}: must be one of {', '.join(o.choices)}")
        out[o.dest] = o.default if v is None else v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="respmeter",
        description="A Redis-protocol proxy that counts every command, exports Prometheus metrics "
        "and protects per-command-billed Redis plans.",
    )
    p.add_argument("--version", action="version", version=f"respmeter {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy", description="Run the proxy. " + (__doc__ or "").split("\n\n")[1])
    _add_options(run, RUN_OPTIONS)
    hp = sub.add_parser(
        "hash-password",
        help="hash a password for the users file",
        description="Read a password (prompted, or one line from standard input) and print the "
        "password_hash to put in a --users file.",
    )
    hp.add_argument("--stdin", action="store_true", help="read the password from standard input")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "run":
        opts = resolve(RUN_OPTIONS, ns, dict(os.environ), parser)
        return run(opts, parser)
    if ns.command == "hash-password":
        return hash_password_command(ns.stdin)
    parser.error(f"unknown command {ns.command}")
    return 2


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


def run(opts: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    from .loops import loop_factory

    logging.basicConfig(
        level=getattr(logging, opts["log_level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        listens = [parse_listen(x) for x in opts["listen"]]
        upstream = parse_upstream(opts["upstream"])
        admin_host, admin_port = parse_hostport(opts["admin"], "--admin")
        upstream = with_password(upstream, opts, dict(os.environ))
        check_safety(opts, listens, upstream)
    except ConfigError as exc:
        print(f"respmeter: {exc}", file=sys.stderr)
        return 2
    secret_filter = SecretFilter([upstream.password or ""])
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    factory, loop_name = loop_factory(opts["loop"])
    app = App(opts, listens, upstream, (admin_host, admin_port), loop_name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(app.main())


def with_password(upstream: Any, opts: dict[str, Any], env: dict[str, str]) -> Any:
    """The upstream with its password from the URL, RESPMETER_UPSTREAM_PASSWORD or the password file."""
    password = upstream.password
    sources = [n for n, present in (("the URL", password is not None),
                                    ("RESPMETER_UPSTREAM_PASSWORD", "RESPMETER_UPSTREAM_PASSWORD" in env),
                                    ("--upstream-password-file", opts["upstream_password_file"] is not None)) if present]
    if len(sources) > 1:
        raise ConfigError("upstream password given more than once: " + " and ".join(sources))
    if "RESPMETER_UPSTREAM_PASSWORD" in env:
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


class App:
    """Wires the proxy, the admin endpoint and signal handling together for ``respmeter run``."""

    def __init__(self, opts: dict[str, Any], listens: list[Listen], upstream: Any, admin: tuple[str, int], loop_name: str) -> None:
        self.opts = opts
        self.listens = listens
        self.upstream = upstream
        self.admin_addr = admin
        self.loop_name = loop_name
        self.log = logging.getLogger("respmeter")

    @staticmethod
    def _offload(fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn`` in a worker thread; call ``done(result)`` back on the event loop."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, fn)
        fut.add_done_callback(lambda f: done(f.result() if not f.exception() else False))

    async def main(self) -> int:
        from prometheus_client import CollectorRegistry

        from .admin import AdminServer
        from .health import Health
        from .metrics import Stats, StatsCollector
        from .server import Proxy, ProxySettings, classify_connect_error

        opts = self.opts
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        settings = ProxySettings(
            upstream,
            connect_timeout=opts["connect_timeout"],
            max_bulk=opts["max_bulk"],
            max_query=opts["max_query_buffer"],
        )
        try:
            if upstream.tls:
                settings.ssl_context = upstream_ssl_context(opts)
            settings.downstream_ssl = downstream_ssl_context(opts)
            verifier = None
            if opts["users"]:
                from .auth import AuthConfigError, Verifier, load_users_file

                try:
                    verifier = Verifier(load_users_file(opts["users"]), self._offload)
                except AuthConfigError as exc:
                    raise ConfigError(str(exc)) from None
        except ConfigError as exc:
            self.log.error("%s", exc)
            return 2

        async def probe() -> str | None:
            loop = asyncio.get_running_loop()
            try:
                if upstream.path:
                    coro = loop.create_unix_connection(asyncio.Protocol, upstream.path)
                else:
                    coro = loop.create_connection(
                        asyncio.Protocol,
                        upstream.host,
                        upstream.port,
                        ssl=settings.ssl_context,
                        server_hostname=upstream.host if settings.ssl_context else None,
                    )
                transport, _ = await asyncio.wait_for(coro, settings.connect_timeout)
            except Exception as exc:  # noqa: BLE001
                return classify_connect_error(exc, settings.connect_timeout)[1]
            transport.close()
            return None

        stats = Stats(opts["client_label_limit"])
        health = Health(probe)
        health.traffic = lambda: stats.bytes["from_upstream"]
        stats.on_quota = health.quota_exceeded

        from .auth import UpstreamAuth
        from .gate import Gate

        def upstream_auth_error(text: str) -> None:
            stats.upstream_error("auth")
            health.failed(f"upstream rejected the proxy's credentials: {text}")
            self.log.error("upstream rejected the proxy's credentials: %s", text)

        gate = Gate(
            verifier=verifier,
            upstream_auth=UpstreamAuth(upstream.username, upstream.password, upstream.db),
            call_later=lambda delay, fn: loop.call_later(delay, fn),
            on_upstream_auth_error=upstream_auth_error,
        )
        if verifier is not None or gate.upstream_auth is not None:
            settings.policy = gate
        registry = CollectorRegistry()
        registry.register(StatsCollector(stats))
        proxy = Proxy(settings, self.listens, stats, health)
        admin = AdminServer(registry, health)
        try:
            await proxy.start()
            await admin.start(*self.admin_addr)
        except OSError as exc:
            self.log.error("cannot listen: %s", exc)
            await proxy.shutdown(0)
            return 1
        self.log.info(
            "respmeter %s proxying to %s (loop: %s)", __version__, upstream.masked(), self.loop_name
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
        await stop.wait()
        await admin.close()
        await proxy.shutdown(opts["shutdown_timeout"])
        self.log.info("stopped")
        return 0
