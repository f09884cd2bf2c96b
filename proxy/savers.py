"""Savers: opt-in answers the proxy gives itself, so that chatty clients (an idle Celery worker above
all) stop paying for commands whose answer is already known.

With no saver enabled nothing here runs and the proxy stays byte-for-byte transparent. Each saver
keeps what clients observe, beyond the cases the README lists:

* ``poll``: a blocking pop (BRPOP, BLPOP) is held upstream with one long timeout, and the client's
  own short timeouts are answered locally (proxy.pollhold);
* ``events``: PUBLISH to a watched channel whose only subscribers are the proxy's own clients is
  answered and delivered by the proxy (proxy.events);
* ``ping``: PING is answered locally while the upstream is proven alive;
* ``handshake``: CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS get the reply the server gave the
  first time;
* ``sweeps``: kombu's binding sweep (a Lua script known by its body) runs at most every
  ``sweep_every`` seconds.

A plain object: the clock and timers are injected; :class:`Savers` is one link of the policy chain
(proxy.gate calls it after authentication and the command policy, before caps and rate limits,
so an answer given here costs no budget).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

from .saverconfig import SaverConfig
from .entries import Admission

COUNTED = ""  # a verdict's outcome when the saver counted the command itself (Stats.count_saved)
PING_ALIVE = 30.0  # seconds: PING is answered locally while the upstream replied this recently


# kombu's binding sweep, recognised by what its body does (never by a SHA): it reads the overdue
# members of the deadline set KEYS[1], deletes their tables and removes them from the set.
_SWEEP_SIGNS = (
    re.compile(rb"ZRANGEBYSCORE['\"]\s*,\s*KEYS\[1\]", re.I),
    re.compile(rb"['\"]ZREM['\"]\s*,\s*KEYS\[1\]", re.I),
    re.compile(rb"['\"]DEL['\"]", re.I),
    re.compile(rb"['\"]TIME['\"]", re.I),
)
NOSCRIPT = b"-NOSCRIPT No matching script. Please use EVAL.\r\n"  # (Redis's own words)
MAX_SCRIPTS = 64  # sweep scripts remembered
MAX_SWEEP_KEYS = 256  # distinct sweep invocations (script, keys, args) timed


def is_sweep_script(body: bytes) -> bool:
    return len(body) < 4096 and all(sign.search(body) for sign in _SWEEP_SIGNS)


def _pong(session: Any, args: list[bytes]) -> bytes:
    """PING's reply as the server gives it in the connection's state."""
    arg = args[1] if len(args) == 2 else None
    if session.protocol == 2 and session.subs.any():
        arg = arg or b""
        return b"*2\r\n$4\r\npong\r\n$%d\r\n%s\r\n" % (len(arg), arg)
    if arg is None:
        return b"+PONG\r\n"
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


class Savers:
    """The savers a proxy runs (see the module docstring)."""

    def __init__(
        self,
        config: SaverConfig,
        stats: Any,
        *,
        handshake: Any = None,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        control: Any = None,
        budget: Any = None,
        keepalive: bool = True,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self.stats = stats
        self.book = handshake  # proxy.handshake.HandshakeBook
        self.clock = clock
        self.keepalive = keepalive
        self.control = control  # proxy.control.ControlLink (the poll saver's CLIENT UNBLOCK)
        self.poll = None
        self.events = None
        if "poll" in self.enabled:
            from .pollhold import PollSaver

            self.poll = PollSaver(
                config, stats, call_later=call_later, control=control, budget=budget
            )
        if "events" in self.enabled:
            from .events import EventsSaver

            self.events = EventsSaver(config.channels, config.recheck, stats, clock=clock)
        self.sweep_shas: dict[bytes, None] = {}
        self.nudged: dict[bytes, None] = {}  # scripts answered NOSCRIPT once (see _nudge)
        self.sweep_last: dict[tuple[bytes, ...], float] = {}
        names: set[str] = set()
        if self.poll is not None:
            names.update(("brpop", "blpop", "select"))
        if self.events is not None:
            names.add("publish")
        if "ping" in self.enabled:
            names.add("ping")
        if "handshake" in self.enabled:
            names.update(("client|setinfo", "client|maint_notifications"))
        if "sweeps" in self.enabled:
            names.update(("evalsha", "eval", "script|load"))
        # commands the session must hand over one by one (never on its fast path)
        self.slow_names = frozenset(names)

    # -- the policy chain (proxy.gate) -----------------------------------------------------------
    def init_session(self, session: Any) -> None:
        if self.poll is not None:
            self.poll.init_session(session)
        if self.events is not None:
            self.events.init_session(session)

    def busy(self, session: Any) -> bool:
        """The session has saver state that every command must look at (not the fast path)."""
        return self.poll is not None and self.poll.busy(session)

    def admit(self, session: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        """None: not a saver's business; else a verdict as Session.admit returns it."""
        if self.poll is not None:
            verdict = self.poll.admit(session, args, name)
            if verdict is not None:
                return verdict
        if name not in self.slow_names or session.multi_view or session.reply_off or session.reply_skip:
            return None
        if name == "ping":
            return self._ping(session, args)
        if name == "publish":
            return self.events.admit(session, args)  # type: ignore[union-attr]
        if name in ("client|setinfo", "client|maint_notifications"):
            return self._handshake(session, args, name)
        if name in ("evalsha", "eval", "script|load"):
            return self._sweep(session, args, name)
        return None

    def shutdown(self) -> None:
        """The proxy is stopping: whatever a saver holds upstream goes back."""
        if self.poll is not None:
            self.poll.shutdown()

    # -- ping --------------------------------------------------------------------------------------
    def alive(self, session: Any) -> bool:
        """The upstream is proven alive for this connection: it replied within PING_ALIVE seconds
        (on this connection; or on any, when TCP keepalive watches every upstream socket)."""
        if not session.connected or not session.got_reply:
            return False
        last = session.last_reply_at
        if self.keepalive:
            last = max(last, self.stats.last_reply_at)
        return session.clock() - last <= PING_ALIVE

    def _ping(self, session: Any, args: list[bytes]) -> tuple[int, Any, str] | None:
        if len(args) > 2 or not self.alive(session):
            return None
        for e in session.pending:
            # a subscription change in flight: the reply's shape is not known yet
            if type(e) is not tuple and e.expect is None:
                return None
        self.stats.count_saved(session.client, "ping", "ping")
        return Admission.REPLY, _pong(session, args), COUNTED

    # -- handshake ---------------------------------------------------------------------------------
    def _handshake(self, session: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        if self.book is None:
            return None
        reply = self.book.recorded(args)
        if reply is None:
            return None  # the first time: it goes upstream, and its reply is recorded
        self.stats.count_saved(session.client, name, "handshake")
        return Admission.REPLY, reply, COUNTED

    # -- sweeps ------------------------------------------------------------------------------------
    def _sweep(self, session: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        if name == "script|load":
            if len(args) == 3 and is_sweep_script(args[2]):
                self._learn(args[2])
            return None
        if len(args) < 3:
            return None
        if name == "eval":
            if not is_sweep_script(args[1]):
                return None
            sha = self._learn(args[1])
        else:
            sha = args[1].lower()
            if sha not in self.sweep_shas:
                return self._nudge(session, args, sha)
        key = (sha, *args[2:])
        now = self.clock()
        last = self.sweep_last.get(key)
        if last is None or now - last >= self.config.sweep_every:
            if last is not None or len(self.sweep_last) < MAX_SWEEP_KEYS:
                self.sweep_last[key] = now
            return None  # this one runs
        self.stats.count_saved(session.client, name, "sweeps")
        return Admission.REPLY, b":0\r\n", COUNTED

    def _nudge(self, session: Any, args: list[bytes], sha: bytes) -> tuple[int, Any, str] | None:
        """A script the proxy never saw loaded (the server kept it from before the proxy started), run
        on kombu's binding deadline set: answered NOSCRIPT once, as a server whose script cache was
        flushed answers, so the client loads it (redis-py does, at once) and the proxy reads its body.
        Costs the client one SCRIPT LOAD per script per proxy start."""
        if len(args) < 4 or args[2] != b"1" or not args[3].endswith(b"binding_deadlines"):
            return None
        if sha in self.nudged or len(self.nudged) >= MAX_SCRIPTS:
            return None
        self.nudged[sha] = None
        self.stats.count_command(session.client, "evalsha", "local")
        return Admission.REPLY, NOSCRIPT, COUNTED

    def _learn(self, body: bytes) -> bytes:
        sha = hashlib.sha1(body).hexdigest().encode()
        if sha not in self.sweep_shas and len(self.sweep_shas) < MAX_SCRIPTS:
            self.sweep_shas[sha] = None
        return sha
