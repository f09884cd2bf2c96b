"""Building the optional parts of a running proxy from its options: the savers (--savers) and the
shared state store (--state-url). Kept out of proxy.cli so that it stays the command line's shell."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .config import parse_upstream


def shared_store(opts: dict[str, Any], local: Any, stats: Any, upstream: Any,
                 ssl_context: Callable[[dict[str, Any]], Any], log: logging.Logger) -> Any:
    """--state-url: the cap leases in Redis (proxy.sharedstore), the rest in ``local``."""
    from .auth import UpstreamAuth
    from .metrics import PROXY_CLIENT
    from .sharedstore import SharedStore, SyncRedis

    on_command = None
    if opts["state_url"].strip().lower() == "upstream":
        target = upstream

        def on_command(name: bytes) -> None:  # billed: counted like the proxy's own commands
            stats.count_upstream(PROXY_CLIENT, name.decode().lower())
    else:
        target = parse_upstream(opts["state_url"], "--state-url")
    ctx = ssl_context(opts) if target.tls else None
    link = SyncRedis(
        target.path or (target.host, target.port),
        handshake=UpstreamAuth(target.username, target.password, target.db).commands(),
        ssl_context=ctx, timeout=min(1.0, opts["connect_timeout"]), on_command=on_command,
    )
    store = SharedStore(link, local, billed=on_command is not None, instance=instance_name(opts, local))
    log.info("caps shared through %s (%s when it is unreachable)", target.address(),
             "refusing commands" if opts["state_fail"] == "closed" else "serving the budget held")
    return store


def instance_name(opts: dict[str, Any], local: Any) -> str:
    """This instance's name in the shared state (--instance), else one kept in its state directory
    (its host name and 4 random hex digits), so that a restarted proxy is the same instance."""
    import os
    import socket

    if opts.get("instance"):
        return str(opts["instance"])
    path = local.dir / "instance"
    try:
        name = path.read_text().strip()
        if name:
            return name
    except OSError:
        pass
    name = f"{socket.gethostname()}-{os.urandom(2).hex()}"
    try:
        path.write_text(name + "\n")
    except OSError as exc:
        log = logging.getLogger("respmeter")
        log.warning("could not keep the instance name in %s: %s", path, exc)
    return name


def state_problem(store: Any, fail: str) -> Callable[[], str | None]:
    """What /healthz says about the shared state store (proxy.health.Health.state_problem)."""

    def problem() -> str | None:
        if store.healthy:
            return None
        if fail == "closed":
            return "shared state store unreachable: refusing commands (--state-fail closed)"
        return "shared state store unreachable: serving only the budget already held (--state-fail open)"

    return problem


def savers(opts: dict[str, Any], settings: Any, stats: Any, book: Any, limits: Any, upstream: Any, loop: Any,
           log: logging.Logger) -> Any:
    """The savers asked for (--savers), or None: the proxy then stays fully transparent."""
    from .saverconfig import SaverConfig, parse_savers

    enabled = parse_savers(opts["savers"])
    if not enabled:
        from .options import RUN_OPTIONS

        defaults = {o.dest: o.default for o in RUN_OPTIONS}
        tuned = [f"--{o.replace('_', '-')}" for o in ("saver_hold", "saver_recheck", "saver_sweep_every")
                 if opts[o] != defaults[o]]
        if tuned:
            log.warning("%s set, but no savers are on (--savers): it has no effect", ", ".join(tuned))
        return None
    from .auth import UpstreamAuth
    from .control import ControlLink
    from .savers import Savers

    config = SaverConfig(
        enabled=enabled, hold=opts["saver_hold"], recheck=opts["saver_recheck"],
        channels=tuple(opts["saver_channels"]), sweep_every=opts["saver_sweep_every"],
    )
    control = None
    if "poll" in enabled:
        auth = UpstreamAuth(upstream.username, upstream.password, upstream.db)
        control = ControlLink(settings, stats, auth.commands(), budget=limits, db=upstream.db or 0)
    return Savers(
        config, stats, handshake=book, call_later=lambda d, fn: loop.call_later(d, fn), control=control,
        budget=limits, keepalive=settings.keepalive is not None,
    )


def pool(size: int, settings: Any, stats: Any, health: Any, book: Any, gate: Any, limits: Any, loop: Any) -> Any:
    """--upstream-pool N: the shared upstream connections (proxy.pool), and the gate's part in it:
    the commands that pin a client or are answered for it never take the session's fast path."""
    from .pool import UpstreamPool, slow_names

    p = UpstreamPool(size, settings, stats, health, book, gate.upstream_auth, limits=limits, loop=loop,
                     on_auth_error=gate.on_upstream_auth_error, on_rejected=gate.on_upstream_rejected,
                     on_auth_ok=gate.on_upstream_auth_ok)
    gate.pool = p
    gate.slow_names = gate.slow_names | slow_names()
    return p
