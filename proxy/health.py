"""Upstream health, judged without sending a single (billable) command.

Evidence comes from what the proxy sees anyway: upstream connects that succeed or fail, replies that
arrive, connections that break. When there has been no evidence for ``fresh`` seconds, a probe opens
a TCP (or TLS) connection to the upstream and closes it without sending anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Health:
    def __init__(
        self,
        probe: Callable[[], Awaitable[str | None]] | None = None,
        *,
        fresh: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe  # returns None when the upstream accepts a connection, else the reason
        self.fresh = fresh
        self.clock = clock
        self.ok_at = float("-inf")
        self.fail_at = float("-inf")
        self.last_reply = float("-inf")  # when upstream bytes were last seen arriving
        self.traffic: Callable[[], int] | None = None  # bytes received from upstream so far
        self._traffic_seen = 0
        self.reason = ""
        self.quota_exceeded_at = float("-inf")
        self.quota_window = 60.0  # unhealthy this long after the upstream's last quota error
        self.quota_reason = ""
        self._probing: asyncio.Future | None = None
        self.auth_reason = ""
        # sticky until a connection gets a RESP reply again (a bare connect proves nothing here):
        # the upstream answered with something that is not RESP, or it stalled
        self.broken_reason = ""
        self.retry = 2.0
        # the shared state store (--state-url): None when it is fine (or not used), else what /healthz says
        self.state_problem: Callable[[], str | None] | None = None
        self._probed_at = float("-inf")

    def ok(self) -> None:
        self.ok_at = self.clock()

    def failed(self, reason: str) -> None:
        self.fail_at = self.clock()
        self.reason = reason
        self.broken_reason = ""  # newer evidence: a connect failed (the server is down, say)
        if self.traffic is not None:  # replies that arrived before the failure are old evidence
            self._traffic_seen = self.traffic()

    def quota_exceeded(self, reason: str) -> None:
        self.quota_exceeded_at = self.clock()
        self.quota_reason = reason

    def _latest_ok(self) -> float:
        # Replies arriving are evidence too; read them from the byte counter, not per read.
        if self.traffic is not None:
            seen = self.traffic()
            if seen != self._traffic_seen:
                self._traffic_seen = seen
                self.last_reply = self.clock()
        return max(self.ok_at, self.last_reply)

    def auth_failed(self, reason: str) -> None:
        """The upstream rejected the proxy's credentials: unhealthy until a handshake succeeds
        (replies that follow, such as NOAUTH errors, are no evidence of health)."""
        self.auth_reason = reason
        self.failed(reason)

    def auth_ok(self) -> None:
        self.auth_reason = ""

    def broken(self, reason: str) -> None:
        """The upstream does not speak RESP, stalled, or refused a connection (at its connection
        limit, a bare connect still succeeds): unhealthy until one replies again."""
        self.failed(reason)
        self.broken_reason = reason

    def replied(self) -> None:
        """A connection got its first RESP reply: the upstream speaks RESP and answers."""
        self.broken_reason = ""

    def sticky(self) -> bool:
        """Failing for a reason that a bare connect cannot clear."""
        return bool(self.auth_reason or self.broken_reason)

    def unhealthy(self) -> bool:
        return self.failing() or self.clock() - self.quota_exceeded_at < self.quota_window

    def stale(self) -> bool:
        """No evidence either way for ``fresh`` seconds (a background probe is due)."""
        return self.clock() - max(self._latest_ok(), self.fail_at) > self.fresh

    def failing(self) -> bool:
        """The latest evidence is a failure (no probe)."""
        return bool(self.auth_reason or self.broken_reason) or self.fail_at > self._latest_ok()

    async def check(self) -> tuple[bool, str]:
        """(healthy, reason). Probes by connecting only when the evidence is stale."""
        now = self.clock()
        stale = now - max(self._latest_ok(), self.fail_at) > self.fresh
        # while failing, look again every few seconds so recovery shows quickly
        retry = self.failing() and not self.sticky() and now - self._probed_at > self.retry
        if (stale or retry) and self.probe is not None:
            self._probed_at = now
            if self._probing is None:
                self._probing = asyncio.ensure_future(self._run_probe())
            try:
                await asyncio.shield(self._probing)
            finally:
                if self._probing is not None and self._probing.done():
                    self._probing = None
        if self.auth_reason:
            return False, self.auth_reason
        if self.broken_reason:
            return False, self.broken_reason
        if self.fail_at > self._latest_ok():
            return False, "upstream unreachable: " + self.reason
        if self.clock() - self.quota_exceeded_at < self.quota_window:
            return False, "upstream request quota exceeded: " + self.quota_reason
        problem = self.state_problem() if self.state_problem is not None else None
        if problem:
            return False, problem
        return True, "ok"

    async def _run_probe(self) -> None:
        assert self.probe is not None
        reason = await self.probe()
        if reason is None:
            self.ok()
        else:
            self.failed(reason)
