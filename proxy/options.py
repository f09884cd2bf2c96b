"""The options of ``respmeter run``: one table that the CLI, the environment and the config file
all read, so a setting has one name everywhere (``--foo-bar``, ``RESPMETER_FOO_BAR``, ``foo_bar``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from .commandpolicy import deny_spec
from .saverconfig import DEFAULT_CHANNELS, savers_type

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
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _hold_seconds(text: str) -> float:
    """The poll saver's hold: at least 1 s (shorter than the clients' own timeouts it would cost more
    than it saves), at most a day."""
    v = _positive_float(text)
    if not 1 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 1 and 86400 seconds: {text!r}")
    return v


def _glob(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty channel glob")
    return text


def _instance(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"not an instance name: {text!r} (1-64 letters, digits, '.', '_', ':' or '-')")
    return text


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _nonneg_int(text: str) -> int:
    v = _whole(text)
    if v < 0 or v > 1024:
        raise argparse.ArgumentTypeError(f"must be 0 to 1024: {text!r}")
    return v


def _positive_int(text: str) -> int:
    v = _whole(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _keepalive(text: str) -> str:
    """IDLE,INTERVAL,COUNT (checked; kept as text, see keepalive_tuple), or 0 for off."""
    keepalive_tuple(text)
    return text.strip()


def keepalive_tuple(text: str) -> tuple[int, int, int] | None:
    t = text.strip()
    if t in ("0", "off", ""):
        return None
    try:
        parts = tuple(int(x) for x in t.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"not IDLE,INTERVAL,COUNT: {text!r} (e.g. 30,10,3; 0 for off)")
    return parts  # type: ignore[return-value]


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _state_dir_default() -> str:
    """The state directory a run started now would use ($XDG_STATE_HOME/respmeter, else
    ~/.local/state/respmeter)."""
    from .store import default_state_dir

    return str(default_state_dir())


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
    sep: str = ","  # separator of a repeatable option's values in its environment variable
    shown_default: Callable[[], str] | None = None  # the default --help shows, when `default` is worked out later

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
    Option("--admin", "127.0.0.1:9380", "admin HTTP endpoint (/metrics, /healthz, /api/usage, /api/traffic)",
           metavar="HOST:PORT"),
    Option("--admin-token", None, "bearer token the admin endpoint then requires on every path but /healthz "
           "(Authorization: Bearer TOKEN); needed for an --admin beyond loopback. A flag shows in ps output: "
           "prefer the environment variable or --admin-token-file", metavar="TOKEN", secret=True),
    Option("--admin-token-file", None, "file holding the admin token (instead of --admin-token)", metavar="FILE"),
    Option("--allow-unauthenticated-admin", False, "allow an --admin beyond loopback without a token",
           boolean=True),
    Option("--log-level", "info", "logging level", choices=("debug", "info", "warning", "error")),
    Option("--loop", "auto", "event loop: uvloop when installed (auto), or force one",
           choices=("auto", "uvloop", "asyncio")),
    Option("--connect-timeout", 5.0, "seconds to wait for an upstream connection", type=_positive_float,
           metavar="SECONDS"),
    Option("--upstream-timeout", 10.0, "seconds a reply may be overdue (a command that does not block; a "
           "blocking one gets its own timeout plus this) before its client gets '-ERR upstream timeout' and "
           "the upstream is reported degraded", type=_positive_float, metavar="SECONDS"),
    Option("--upstream-pool", 0, "share N upstream connections (per protocol) among clients in their default "
           "state, their commands batched; a client gets a connection of its own at its first blocking, pub/sub, "
           "MULTI/WATCH or other connection-bound command; 0: one upstream connection per client (see README: "
           "Upstream pooling)", type=_nonneg_int, metavar="N"),
    Option("--upstream-keepalive", "30,10,3", "TCP keepalive of upstream connections: IDLE,INTERVAL,COUNT "
           "seconds/probes ('0' turns it off); finds dead connections without a billable command",
           type=_keepalive, metavar="I,I,N"),
    Option("--shutdown-timeout", 5.0, "on SIGTERM/SIGINT, the most seconds to drain: each client is closed "
           "once quiet with nothing in flight, and a blocking pop asked for meanwhile is never sent (below "
           "Docker's and Kubernetes' default grace periods)",
           type=_positive_float, metavar="SECONDS"),
    Option("--max-bulk", 512 * 1024**2, "largest bulk string a client may send (Redis: proto-max-bulk-len)",
           type=_size, metavar="SIZE"),
    Option("--max-query-buffer", 1024**3, "largest incomplete request a client may hold "
           "(Redis: client-query-buffer-limit)", type=_size, metavar="SIZE"),
    Option("--max-clients", 10_000, "most client connections at once; beyond it a new client gets "
           "'-ERR max number of clients reached' and is closed (Redis: maxclients)", type=_positive_int,
           metavar="N"),
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
    Option("--deny-commands", "@default", "commands clients may not send, comma separated, in commandstats "
           "naming (config, acl|list); !NAME re-allows (!acl|whoami), @default is the default list, '' "
           "denies nothing (see README: Command policy)", type=deny_spec, metavar="NAMES"),
    # state, caps and limits
    Option("--config", None, "TOML config file (see README); flags and env vars override it", metavar="FILE"),
    Option("--state-dir", None, "where usage state (SQLite) lives; the default follows XDG_STATE_HOME",
           metavar="DIR", shown_default=_state_dir_default),
    Option("--state-url", None, "share the caps with other proxies through Redis: redis://, rediss:// (TLS "
           "and credentials as for the upstream), or 'upstream' for the upstream itself; SQLite under "
           "--state-dir stays for one host", metavar="URL", secret=True),
    Option("--state-fail", "closed", "when the shared state store is unreachable: refuse commands (closed), or "
           "serve from the budget already held and no more (open)", choices=("closed", "open")),
    Option("--instance", None, "this proxy's name in the shared state (--state-url) and the fleet's report; "
           "default: the host name and 4 random hex digits, kept in --state-dir", type=_instance, metavar="NAME"),
    Option("--daily-cap", None, "hard cap on upstream (billable) commands per day, all clients", type=_positive_int,
           metavar="N"),
    Option("--monthly-cap", None, "hard cap on upstream commands per calendar month, all clients",
           type=_positive_int, metavar="N"),
    Option("--client-cap", [], "a per-client cap: IDENTITY:daily=N or IDENTITY:monthly=N; repeatable",
           type=str, multiple=True, metavar="ID:WINDOW=N"),
    Option("--cap-timezone", "UTC", "timezone in which days and months start (IANA name)", metavar="TZ"),
    Option("--on-cap", "error", "at the cap, blocking pops (BRPOP, ...) get the cap error (error), or wait "
           "their timeout and get an empty reply (idle); with idle the proxy also answers PING itself and "
           "PUBLISH with 0, so heartbeats do not turn into error loops", choices=("error", "idle")),
    Option("--rate-limit", [], "a rate limit: name=N,rate=10/s[,burst=B][,client=GLOB][,command=GLOB]"
           "[,action=delay|reject][,max_queue=N]; repeatable (env: separated by ';')", multiple=True,
           metavar="SPEC", sep=";"),
    # savers (proxy.savers): commands answered by the proxy itself; none unless asked for
    Option("--savers", "", "savers to run: the preset 'celery' (poll,events,ping,handshake,sweeps), or a "
           "comma-separated list of poll, events, ping, handshake, sweeps; '' or none: fully transparent "
           "(see README: Savers)", type=savers_type, metavar="LIST", shown_default=lambda: "none"),
    Option("--saver-hold", 300.0, "poll saver: upstream timeout of the one blocking pop held for a client's "
           "short ones (1 to 86400)", type=_hold_seconds, metavar="SECONDS"),
    Option("--saver-recheck", 60.0, "events saver: a watched PUBLISH goes upstream at least this often",
           type=_positive_float, metavar="SECONDS"),
    Option("--saver-channels", list(DEFAULT_CHANNELS), "events saver: globs of the channels whose PUBLISH it "
           "may answer; repeatable", type=_glob, multiple=True, metavar="GLOB"),
    Option("--saver-sweep-every", 600.0, "sweeps saver: kombu's binding sweep goes upstream at most this "
           "often", type=_positive_float, metavar="SECONDS"),
    Option("--track-patterns", True, "count commands per key pattern (for respmeter report)", type=_bool,
           metavar="BOOL"),
    Option("--pattern-limit", 1000, "distinct key patterns kept; the rest count as 'other'", type=_positive_int,
           metavar="N"),
]


