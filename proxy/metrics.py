"""Counters the proxy keeps itself, exported to Prometheus through a custom collector.

The hot path only touches plain dicts and ints (no locks, no prometheus_client objects); a scrape
turns them into metric families. Every label set is bounded: commands come from the command table
(plus ``unknown``), clients from :class:`LabelSet` (capped, with an ``other`` bucket).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from . import __version__
from .resp import _speedups, hot_path

OUTCOMES = ("ok", "error", "rejected", "local")
# why the proxy refused a command (respmeter_rejections_total{reason})
REJECTION_REASONS = (
    "cap", "rate_limit", "rate_limit_queue_full", "noauth", "auth_failed", "denied", "upstream_unavailable",
    "state_unavailable",
)
# upstream failure kinds exported from the start (others appear when they happen)
UPSTREAM_ERROR_KINDS = (
    "connect_refused", "connect_timeout", "connect_error", "dns", "tls", "auth", "reset", "eof", "protocol", "timeout",
)
REFUSAL_REASONS = ("max_clients", "out_of_fds", "slow_reader")
PROXY_CLIENT = "respmeter"  # client label of the commands the proxy sends on its own behalf
ANONYMOUS = "anonymous"
OTHER = "other"

# 50 µs .. 10 s, roughly 2.5x apart.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LabelSet:
    """Admits at most ``limit`` distinct client names; later ones are labelled ``other``.

    Names are decoded leniently and truncated so a client cannot inflate a label's size either.
    Names that the policy is keyed on (caps, rate limits, users: :meth:`keep`) are never folded into
    ``other``, however many names came first: using up the labels must not move a client out of
    its cap. A name matching a rate limit's glob, past the limit, is labelled with the glob itself
    (one label per rule, and the rule still applies to it).
    """

    __slots__ = ("limit", "_known", "reserved", "kept", "globs")

    def __init__(self, limit: int = 100, reserved: Iterable[str] = ()) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self.reserved = frozenset((ANONYMOUS, OTHER, PROXY_CLIENT, *reserved))
        self.kept: frozenset[str] = frozenset()
        self.globs: tuple[str, ...] = ()

    def keep(self, names: Iterable[str], globs: Iterable[str] = ()) -> None:
        """Names (and globs) that caps, rate limits or users are keyed on."""
        self.kept = frozenset(n for n in names if n not in self.reserved)
        self.globs = tuple(g for g in globs if g != "*")

    def label(self, name: bytes | str | None) -> str:
        if not name:
            return ANONYMOUS
        if isinstance(name, bytes):
            name = name[:128].decode("utf-8", "replace")
        else:
            name = name[:128]
        if name in self.reserved:
            return name + "_"  # a client cannot pass itself off as the proxy or a bucket
        if name in self._known or name in self.kept:
            return name
        if len(self._known) >= self.limit:
            for glob in self.globs:
                if fnmatch.fnmatchcase(name, glob):
                    return glob
            return OTHER
        self._known.add(name)
        return name


class Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.total += seconds * n
        self.n += n


# its C twin (proxy/_speedups.c: the same counts, total and n), when built: observe() is one C call
_CHistogram = getattr(_speedups, "Histogram", None) if _speedups is not None else None
C_HISTOGRAM = _CHistogram is not None


def new_histogram() -> Histogram:
    return _CHistogram(LATENCY_BUCKETS) if _CHistogram is not None else Histogram()


class Stats:
    """All counters of one proxy process."""

    def __init__(self, client_label_limit: int = 100) -> None:
        self.labels = LabelSet(client_label_limit)
        self.commands: dict[tuple[str, str, str], int] = {}  # (client, command, outcome)
        self.upstream: dict[tuple[str, str], int] = {}  # (client, command): billable
        # (client, command, saver): commands a saver (proxy.savers) answered instead of the upstream
        self.saved: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.bytes = {"from_client": 0, "to_client": 0, "to_upstream": 0, "from_upstream": 0}
        self.client_connections = 0
        self.connections_total = 0
        self.upstream_connections = 0  # open now: a client's own, and the pool's shared ones
        self.pinned_clients = 0  # pooled clients that left the pool for a connection of their own
        self.pinned_total: dict[str, int] = {}  # ... since the start, by reason
        # client connections closed at once: max_clients (--max-clients), out_of_fds (the process
        # ran out of file descriptors)
        self.refused_connections: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.protocol_errors = 0
        self.pushes = 0
        self.unpaired_replies = 0
        self.upstream_quota_exceeded = 0
        self.cap_rejections: dict[str, int] = {}  # window -> commands refused at the cap
        self.rejections: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)
        self.patterns = None  # proxy.patterns.PatternTracker, when key patterns are tracked
        self.on_quota: Callable[[str], None] | None = None  # told the upstream's quota error text
        # told that the upstream sent something that is not RESP (what it was), and that a
        # connection got its first RESP reply (proxy.health keeps them)
        self.on_upstream_broken: Callable[[str], None] | None = None
        self.on_upstream_reply: Callable[[], None] | None = None
        # told the error a server greets a new connection with before anything was asked of it
        # (Redis at maxclients writes it and closes): the server refused the connection
        self.on_upstream_refused: Callable[[str], None] | None = None
        self.last_reply_at = 0.0  # when an upstream connection last sent anything (session clock)
        self.saver_item_held_max = 0.0  # proxy.pollhold: the longest an item stayed in the proxy

    # -- hot path helpers ---------------------------------------------------------------
    def count_command(self, client: str, command: str, outcome: str, n: int = 1) -> None:
        """``outcome`` may carry a reason: "rejected:cap" counts as outcome "rejected", reason "cap"."""
        if ":" in outcome:
            outcome, _, reason = outcome.partition(":")
            self.rejections[reason] = self.rejections.get(reason, 0) + n
        key = (client, command, outcome)
        d = self.commands
        d[key] = d.get(key, 0) + n

    def count_saved(self, client: str, command: str, saver: str, n: int = 1) -> None:
        """A command answered by a saver: outcome ``local``, and the saving by saver."""
        self.count_command(client, command, "local", n)
        key = (client, command, saver)
        d = self.saved
        d[key] = d.get(key, 0) + n

    def count_upstream(self, client: str, command: str, n: int = 1) -> None:
        key = (client, command)
        d = self.upstream
        d[key] = d.get(key, 0) + n

    def observe_latency(self, command: str, seconds: float, n: int = 1) -> None:
        h = self.latency.get(command)
        if h is None:
            h = self.latency[command] = new_histogram()
        if C_HISTOGRAM:
            h.observe(seconds, n)
            return
        # (Histogram.observe, inlined: this runs for every reply)
        h.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += n
        h.total += seconds * n
        h.n += n

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    # -- views --------------------------------------------------------------------------
    def upstream_total(self) -> int:
        return sum(self.upstream.values())

    def upstream_by_command(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, cmd), n in self.upstream.items():
            out[cmd] = out.get(cmd, 0) + n
        return out


class StatsCollector(Collector):
    """Exports :class:`Stats` (and any extra collectors' families) at scrape time."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats
        c = CounterMetricFamily(
            "respmeter_commands",
            "Commands received from clients, by client identity, command and outcome "
            "(ok, error: forwarded and the reply was or was not an error; rejected: refused by "
            "the proxy; local: answered by the proxy).",
            labels=("client", "command", "outcome"),
        )
        for (client, cmd, outcome), n in sorted(s.commands.items()):
            c.add_metric((client, cmd, outcome), n)
        yield c

        u = CounterMetricFamily(
            "respmeter_upstream_commands",
            "Commands sent to the upstream server (the billable count), by client identity and "
            "command; client 'respmeter' is the proxy itself.",
            labels=("client", "command"),
        )
        for (client, cmd), n in sorted(s.upstream.items()):
            u.add_metric((client, cmd), n)
        yield u

        sv = CounterMetricFamily(
            "respmeter_saved_commands",
            "Commands a saver (--savers) answered in the proxy instead of sending them upstream, by "
            "client identity, command and saver (poll, events, ping, handshake, sweeps); each is also "
            "counted in respmeter_commands_total with outcome local.",
            labels=("client", "command", "saver"),
        )
        for (client, cmd, saver), n in sorted(getattr(s, "saved", {}).items()):
            sv.add_metric((client, cmd, saver), n)
        yield sv
        yield GaugeMetricFamily(
            "respmeter_saver_item_held_seconds_max",
            "poll saver: the longest an item popped upstream stayed in the proxy before it reached a "
            "client or went back to its list (the window in which a kill -9 of the proxy could lose it).",
            value=s.saver_item_held_max,
        )

        h = HistogramMetricFamily(
            "respmeter_command_duration_seconds",
            "Round trip from forwarding a command to its reply, by command. Blocking commands "
            "(BRPOP, XREAD BLOCK, WAIT, ...) and subscriptions are not observed.",
            labels=("command",),
        )
        for cmd, hist in sorted(s.latency.items()):
            buckets = []
            acc = 0
            for bound, n in zip(LATENCY_BUCKETS, hist.counts):
                acc += n
                buckets.append((repr(bound), acc))
            buckets.append(("+Inf", hist.n))
            h.add_metric((cmd,), buckets, hist.total)
        yield h

        b = CounterMetricFamily(
            "respmeter_bytes",
            "Bytes moved, by direction (from_client, to_client, to_upstream, from_upstream).",
            labels=("direction",),
        )
        for direction, n in s.bytes.items():
            b.add_metric((direction,), n)
        yield b

        yield GaugeMetricFamily(
            "respmeter_client_connections", "Client connections open now.", value=s.client_connections
        )
        yield CounterMetricFamily(
            "respmeter_connections", "Client connections accepted.", value=s.connections_total
        )
        yield GaugeMetricFamily(
            "respmeter_upstream_connections",
            "Upstream connections open now: clients' own and, with --upstream-pool, the shared ones.",
            value=s.upstream_connections,
        )
        yield GaugeMetricFamily(
            "respmeter_pinned_clients",
            "Clients that left the upstream pool (--upstream-pool) for a connection of their own, open now "
            "(0 without a pool).",
            value=s.pinned_clients,
        )
        pt = CounterMetricFamily(
            "respmeter_pinned",
            "Clients that left the upstream pool for a connection of their own, by reason (blocking, "
            "pubsub, transaction, connection state, select db, unknown command, large request, hello, auth, ...).",
            labels=("reason",),
        )
        for reason, n in sorted(s.pinned_total.items()):
            pt.add_metric((reason,), n)
        yield pt
        rc = CounterMetricFamily(
            "respmeter_refused_connections",
            "Client connections refused with an error and closed, by reason (max_clients: "
            "--max-clients reached; out_of_fds: the process ran out of file descriptors; slow_reader: a "
            "client on the upstream pool left its replies unread too long).",
            labels=("reason",),
        )
        for reason, n in sorted(s.refused_connections.items()):
            rc.add_metric((reason,), n)
        yield rc
        e = CounterMetricFamily(
            "respmeter_upstream_errors",
            "Upstream failures by kind (connect_refused, connect_timeout, dns, tls, reset, eof, "
            "protocol, ...).",
            labels=("kind",),
        )
        for kind, n in sorted(s.upstream_errors.items()):
            e.add_metric((kind,), n)
        yield e
        r = CounterMetricFamily(
            "respmeter_rejections",
            "Commands the proxy refused, by reason (cap, rate_limit, rate_limit_queue_full, noauth, "
            "auth_failed, denied, upstream_unavailable, state_unavailable).",
            labels=("reason",),
        )
        for reason, n in sorted(s.rejections.items()):
            r.add_metric((reason,), n)
        yield r
        yield CounterMetricFamily(
            "respmeter_protocol_errors",
            "Client connections closed for malformed or oversized requests.",
            value=s.protocol_errors,
        )
        yield CounterMetricFamily(
            "respmeter_push_messages",
            "Out-of-band frames passed to clients (pub/sub messages, RESP3 pushes, MONITOR lines).",
            value=s.pushes,
        )
        yield CounterMetricFamily(
            "respmeter_upstream_quota_exceeded",
            "Replies in which the upstream said its request quota is used up (Upstash: 'ERR max "
            "requests limit exceeded', 'ERR max daily request limit exceeded').",
            value=s.upstream_quota_exceeded,
        )
        i = InfoMetricFamily("respmeter_build", "respmeter build information.")
        # hot_path: "C", or "Python" when proxy/_speedups.c is not built (about half the pipelined
        # throughput; counting is the same)
        i.add_metric((), {"version": __version__, "hot_path": hot_path()})
        yield i


class LimitsCollector(Collector):
    """Exports cap usage and rate-limit counters (proxy.limits.Limits) at scrape time."""

    def __init__(self, limits) -> None:  # noqa: ANN001
        self.limits = limits

    def collect(self) -> Iterator:
        lim = self.limits
        used = GaugeMetricFamily(
            "respmeter_quota_used",
            "Billable commands used in the current window (daily, monthly), for all clients "
            "(client=\"all\") and per client identity that has its own cap.",
            labels=("window", "client"),
        )
        limit = GaugeMetricFamily(
            "respmeter_quota_limit",
            "The cap of the window (absent when there is none).",
            labels=("window", "client"),
        )
        reset = GaugeMetricFamily(
            "respmeter_quota_reset_timestamp_seconds",
            "When the current window resets (unix time).",
            labels=("window",),
        )
        try:
            for window in ("daily", "monthly"):
                reset.add_metric((window,), lim.bounds[window][1])
                cap = getattr(lim.caps, window)
                used.add_metric((window, "all"), lim.used(window) if cap else lim.counted_total(window))
                if cap:
                    limit.add_metric((window, "all"), cap)
                for client, spec in sorted(lim.caps.clients.items()):
                    ccap = spec.get(window)
                    if ccap:
                        used.add_metric((window, client), lim.used(window, client))
                        limit.add_metric((window, client), ccap)
        except Exception:  # noqa: BLE001 - a locked state file must not break the scrape
            pass
        yield used
        yield limit
        yield reset
        t = CounterMetricFamily(
            "respmeter_throttled",
            "Commands held (action=delay) or refused (action=reject) by a rate limit rule.",
            labels=("rule", "action"),
        )
        throttled = {(rule.name, rule.action): 0 for rule in lim.rules}
        throttled.update(lim.throttled)
        for (rule, action), n in sorted(throttled.items()):
            t.add_metric((rule, action), n)
        yield t
        c = CounterMetricFamily(
            "respmeter_cap_rejections",
            "Commands refused because a cap was reached, by window.",
            labels=("window",),
        )
        if lim.stats is not None:
            per_window = {w: 0 for w in ("daily", "monthly") if getattr(lim.caps, w) or any(
                spec.get(w) for spec in lim.caps.clients.values())}
            per_window.update(lim.stats.cap_rejections)
            for window, n in sorted(per_window.items()):
                c.add_metric((window,), n)
        yield c


class HealthCollector(Collector):
    """respmeter_upstream_up from the health evidence (never probes, never sends a command)."""

    def __init__(self, health) -> None:  # noqa: ANN001
        self.health = health

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "respmeter_upstream_up",
            "1 when the latest evidence (connects, replies, probes) says the upstream is reachable, "
            "0 after a failure (connection refused, TLS error, credentials rejected, ...).",
            value=0 if self.health.failing() else 1,
        )
        yield GaugeMetricFamily(
            "respmeter_healthy",
            "What /healthz would answer without probing: 1 for 200, 0 for 503 (upstream failing, "
            "credentials rejected, or its request quota exceeded in the last minute).",
            value=0 if self.health.unhealthy() else 1,
        )
