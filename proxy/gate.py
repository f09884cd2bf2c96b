"""The policy chain a Session consults for each command: client authentication and upstream
credentials first (proxy.auth), then the command policy (proxy.commandpolicy), then caps and rate
limits (proxy.limits). A plain object: time and background work come in as injected callables, so
tests drive it without an event loop."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from .auth import (
    HELLO_NOAUTH,
    NOAUTH,
    PRE_AUTH,
    WRONGPASS,
    FailureThrottle,
    UpstreamAuth,
    Verifier,
    encode_handshake,
    split_hello,
)
from . import commands as cmdtable
from .commandpolicy import CommandPolicy
from .paths import BLOCKING_NAMES
from .pool import admit as pool_admit
from .quotaerrors import UPSTREAM_REFUSED, credentials_refused
from .resp import encode_command, encode_error
from .entries import Admission
from .handshake import REWRITTEN_NAMES, rewrite
from .session import Session

log = logging.getLogger("respmeter.gate")

FORWARD = (Admission.FORWARD, None, "")
OK = b"+OK\r\n"
DENIED = "rejected:denied"
# Redis's own answer to an EXEC after a command was refused while queueing
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
DISCARD = [b"DISCARD"]
DISCARD_INFO = cmdtable.lookup(DISCARD)
# not queued inside MULTI: refusing them does not abort the transaction (as on Redis)
NOT_QUEUED = frozenset({"exec", "discard", "multi", "watch", "quit", "reset"})


class Gate:
    def __init__(
        self,
        *,
        verifier: Verifier | None = None,
        upstream_auth: UpstreamAuth | None = None,
        limits: Any = None,
        throttle: FailureThrottle | None = None,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_upstream_auth_error: Callable[[str], None] | None = None,
        on_upstream_auth_ok: Callable[[], None] | None = None,
        on_upstream_rejected: Callable[[str], None] | None = None,
        commands: CommandPolicy | None = None,
        handshake: Any = None,
        savers: Any = None,
    ) -> None:
        self.verifier = verifier
        # proxy.handshake.HandshakeBook: sessions record the server's handshake replies into it
        self.handshake = handshake
        self.upstream_auth = upstream_auth if upstream_auth is not None and upstream_auth.active else None
        self.limits = limits
        self.throttle = throttle or FailureThrottle(clock=clock)
        self.call_later = call_later
        self.clock = clock
        self.on_upstream_auth_error = on_upstream_auth_error
        self.on_upstream_auth_ok = on_upstream_auth_ok
        self.on_upstream_rejected = on_upstream_rejected
        # answer a client's AUTH locally (never forward its credentials)?
        self.intercept_auth = verifier is not None or self.upstream_auth is not None
        # sessions whose login check holds a unit of their address's failure budget
        self._checking: set[Session] = set()
        # per address, sessions waiting for budget to start their check (first come, first woken)
        self._parked: dict[str, dict[Session, None]] = {}
        self.commands = commands if commands else None
        self.pool: Any = None  # proxy.pool.UpstreamPool (--upstream-pool N; set by proxy.assemble)
        # Names the session must hand to ``admit`` one by one, never forward on its fast path (a
        # Session takes them from its policy: proxy.paths.fast_sets).
        self.denied_names: frozenset[str] = commands.slow_names if commands else frozenset()
        self.slow_names = self.denied_names | REWRITTEN_NAMES
        # proxy.savers.Savers: commands answered by the proxy itself (after authentication and
        # the command policy, before caps: an answer given there costs no budget)
        self.savers = savers if savers is not None and savers.enabled else None
        if self.savers is not None:
            self.slow_names = self.slow_names | self.savers.slow_names

    # -- Session policy protocol --------------------------------------------------------------
    def init_session(self, session: Session) -> None:
        session.authed = self.verifier is None
        session.up_ready = self.upstream_auth is None
        if self.verifier is not None:
            session.on_close.append(lambda: self._forget(session))
        session.tx_denied = False  # a command was denied inside MULTI: its EXEC aborts
        session.hello_authed = False  # HELLO ... AUTH checked, waiting for the upstream connection
        session.up_pending = 0  # the proxy's handshake commands still to be answered
        # ... and one of them was refused: True (the credentials), or the server's error reply
        # when it refused the connection for its own reason (proxy.quotaerrors.credentials_refused)
        session.up_refused = False
        if self.limits is not None:
            self.limits.init_session(session)
        if self.savers is not None:
            self.savers.init_session(session)

    def fast_admit(self, session: Session, n: int) -> bool:
        # (denied names never reach the fast path: the session leaves slow_names out of it)
        if not session.up_ready or session.parser.unauth:  # (not authed)
            return False
        if self.savers is not None and self.savers.busy(session):
            return False
        limits = self.limits
        if limits is None:
            return True
        if limits.free:
            # (Limits.fast_admit with no cap and no rule, inlined: only the window rollover)
            now = limits.clock()
            if now >= limits.next_reset:
                limits._rollover(now)
            return True
        return limits.fast_admit(session, n)

    def fast_refund(self, session: Session, n: int) -> None:
        if self.limits is not None:
            self.limits.fast_refund(session, n)

    def admit(self, session: Session, args: list[bytes], info: Any, name: str) -> tuple[int, Any, str]:
        if session.draining and name in BLOCKING_NAMES:
            # shutting down: a blocking command is not sent (it could take an item the client would
            # then have no time to acknowledge); the connection closes with it held
            session.drain_held = True
            return Admission.WAIT, None, ""
        if session.pin_answer is not None and name == "auth":
            # the AUTH that took this client off the pool went first on its own connection (proxy.pool)
            reply, session.pin_answer = session.pin_answer, None
            return Admission.REPLY, reply, ("error" if reply[:1] == b"-" else "ok")
        if self.intercept_auth or not session.authed:
            verdict = self._auth(session, args, name)
            if verdict is not None:
                return verdict
        if name in self.denied_names:
            reply = self.commands.check(args, name)  # type: ignore[union-attr]
            if reply is not None:
                if session.multi_view and name not in NOT_QUEUED:
                    session.tx_denied = True
                return Admission.REPLY, reply, DENIED
        if session.tx_denied:
            if name == "exec":
                return self._abort_exec(session)
            if name in ("discard", "reset"):
                session.tx_denied = False
        if session.pool_link is not None and self.pool is not None:
            # on the shared upstream connections (proxy.pool): answered there, or the client
            # leaves them for a connection of its own
            verdict = pool_admit(self.pool, session, args, name)
            if verdict is not None:
                if verdict[0] == "reply":
                    return Admission.REPLY, verdict[1], "local"
                return Admission.WAIT, None, ""
        if session.up_pending:
            # The proxy's credentials are being checked upstream: nothing of the client's goes
            # before the answer (if they are refused, nothing goes at all: fail closed).
            return Admission.WAIT, None, ""
        if name == "reset" and not session.up_ready and self.upstream_auth is not None:
            # nothing was sent upstream yet: a local RESET is exact
            self._after_reset(session, name)
            return Admission.REPLY, b"+RESET\r\n", "local"
        hello_args = None
        if name == "hello" and self.intercept_auth:
            hello_args, _ = split_hello(args)
        # the proxy's own commands that would go with this one
        handshake: list[list[bytes]] = []
        merge_into_hello = False
        if not session.up_ready and self.upstream_auth is not None:
            if hello_args is not None and not self.upstream_auth.db and len(hello_args) >= 2:
                merge_into_hello = True
            else:
                handshake = self.upstream_auth.commands()
        if handshake:
            # The proxy's own AUTH (and SELECT) go first, alone; the command waits for their
            # answer and is looked at again then (see _handshake_reply).
            if self.limits is not None:
                verdict = self.limits.charge(session, len(handshake), args, name)
                if verdict is not None:
                    return verdict
            session.up_pending = len(handshake)
            for c in handshake:
                session.send_internal(c, lambda error, data: self._handshake_reply(session, error, data))
            return Admission.WAIT, None, ""
        if self.savers is not None and not merge_into_hello:
            verdict = self.savers.admit(session, args, name)
            if verdict is not None:
                return verdict
        if self.limits is not None:
            verdict = self.limits.admit(session, args, info, name, 0)
            if verdict is not None:
                return verdict
        if merge_into_hello:
            # HELLO carries the proxy's AUTH (one command, not two); what follows waits for its reply
            assert hello_args is not None and self.upstream_auth is not None
            session.up_pending = 1
            new = hello_args[:2] + self.upstream_auth.hello_auth() + hello_args[2:]
            session.hello_auth_check = lambda error, data: self._handshake_reply(session, error, data)
            self._after_reset(session, name)
            return Admission.REPLACE, encode_command(new), ""
        self._after_reset(session, name)
        if hello_args is not None and hello_args != args:
            return Admission.REPLACE, encode_command(hello_args), ""
        if (self.pool is not None and name in ("client|list", "client|kill") and session.pool_link is None
                and not session.multi_view):
            verdict = self.pool.introspect(session, args, name)  # (the pooled clients are the proxy's to show)
            if verdict is not None:
                return verdict
        if name in REWRITTEN_NAMES:
            new_args = rewrite(args, name)
            if new_args is not None:
                return Admission.REPLACE, encode_command(new_args), ""
        return FORWARD

    def deny_reply(self, args: list[bytes], name: str) -> bytes | None:
        """The reply to a denied command, or None: for a session that cannot place the reply in
        order (MONITOR mode) and refuses the command its own way."""
        return self.commands.check(args, name) if self.commands is not None else None

    def _abort_exec(self, session: Session) -> tuple[int, Any, str]:
        """EXEC after a command was denied inside MULTI: the server never saw that command, so it
        would run the rest. The transaction is discarded instead, and the client gets Redis's own
        EXECABORT, as when a server refuses a command while queueing. The DISCARD sent in the EXEC's
        place is the limits' business like any command (it uses the budget MULTI kept aside)."""
        if self.limits is not None:
            verdict = self.limits.admit(session, DISCARD, DISCARD_INFO, "discard", 0)
            if verdict is not None:
                return verdict  # held or refused by a rate limit: this EXEC is looked at again later
        session.tx_denied = False
        discard = session.push_internal(DISCARD, None)
        return Admission.INJECT_REPLY, (discard, EXECABORT, DENIED), ""

    def _after_reset(self, session: Session, name: str) -> None:
        if name != "reset":
            return
        # RESET de-authenticates the connection, as on Redis: the upstream one is authenticated
        # again before the next command, and a proxy user must AUTH again.
        if self.upstream_auth is not None:
            session.up_ready = False
        if self.verifier is not None:
            session.authed = False
            session.set_user(None)

    # -- authentication ----------------------------------------------------------------------------
    def _auth(self, session: Session, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        if name == "auth":
            if len(args) == 2:
                user, password = b"default", args[1]
            elif len(args) == 3:
                user, password = args[1], args[2]
            else:
                return Admission.REPLY, encode_error("ERR wrong number of arguments for 'auth' command"), "local"
            return self._login(session, user, password, OK)
        if name == "hello":
            _, creds = split_hello(args)
            if creds is not None:
                if len(args) >= 2 and args[1] not in (b"2", b"3"):
                    return Admission.REPLY, encode_error("NOPROTO unsupported protocol version"), "local"
                if session.hello_authed:  # checked already: it waited for its upstream connection
                    if session.authed and not session.connected:
                        return Admission.WAIT, None, ""
                    session.hello_authed = False
                    return None
                verdict = self._login(session, creds[0], creds[1], None)
                if verdict is not None:
                    return verdict
                if not session.connected:
                    # authenticated, and only now is an upstream connection opened for this
                    # client: HELLO waits for it, and goes on without a second check
                    session.hello_authed = True
                    return Admission.WAIT, None, ""
                return None  # authenticated: forward HELLO (without the client's AUTH)
            if not session.authed:
                return Admission.REPLY, HELLO_NOAUTH, "rejected:noauth"
            return None
        if not session.authed:
            if name == "quit":
                session.close_after_reply = True
                return Admission.REPLY, OK, "local"
            if name == "reset":
                return Admission.REPLY, b"+RESET\r\n", "local"
            if name not in PRE_AUTH:
                return Admission.REPLY, NOAUTH, "rejected:noauth"
        return None

    def _login(self, session: Session, user: bytes, password: bytes, ok_reply: bytes | None) -> tuple[int, Any, str] | None:
        """Check a client's credentials. None: accepted and the command goes on (HELLO).

        A pair already known to be wrong is answered at once and costs nothing (a client retrying
        the same wrong password learns nothing new). Any other check first takes a unit of its
        source address's failure budget (FailureThrottle); without one the command waits, before
        any hashing, so neither the answer nor its timing says anything until the budget allows a
        check. The unit is settled when the check ends, even if the client has gone by then."""
        verifier = self.verifier
        if verifier is None:
            # No proxy users: the upstream credentials are the proxy's; accept and answer locally.
            return (Admission.REPLY, ok_reply, "local") if ok_reply is not None else None
        host = _host(session.peer)
        addr = budget_key(host)
        if session in self._checking:
            result = verifier.outcome(user, password)
            if result is None:
                return Admission.WAIT, None, ""  # still running (or a stray wake-up)
            self._checking.discard(session)
        elif verifier.outcome(user, password) is False:
            # (logged at debug only: a client retrying in a loop must not flood the log)
            log.debug("authentication failed again for user %r from %s", user.decode("utf-8", "replace")[:64], host)
            return Admission.REPLY, WRONGPASS, "rejected:auth_failed"
        else:
            wait = self.throttle.begin(addr)
            if wait > 0:
                self._park(session, addr, wait)
                return Admission.WAIT, None, ""
            self._unpark(session, addr)
            self._checking.add(session)
            result = verifier.check(user, password, lambda: self._check_done(session, addr, user, password))
            if result is None:
                return Admission.WAIT, None, ""
            self._checking.discard(session)
            self._settle(addr, result)
        if not result:
            log.info("authentication failed for user %r from %s", user.decode("utf-8", "replace")[:64], host)
            return Admission.REPLY, WRONGPASS, "rejected:auth_failed"
        u = verifier.users[user.decode("utf-8", "replace")]
        session.authed = True
        session.set_user(u.label)
        return (Admission.REPLY, ok_reply, "local") if ok_reply is not None else None

    def _check_done(self, session: Session, addr: str, user: bytes, password: bytes) -> None:
        """An offloaded check ended (called once per check begun, whatever became of the client)."""
        assert self.verifier is not None
        self._settle(addr, bool(self.verifier.outcome(user, password)))
        if session in self._checking and not session.closed:
            session.resume()

    def _settle(self, addr: str, ok: bool) -> None:
        self.throttle.end(addr, failed=not ok)
        if ok:
            # its unit came back: the first session waiting on this address may start its check
            parked = self._parked.get(addr)
            while parked:
                first = next(iter(parked))
                del parked[first]
                if not first.closed:
                    first.resume()
                    break
            if not parked:
                self._parked.pop(addr, None)

    def _park(self, session: Session, addr: str, wait: float) -> None:
        self._parked.setdefault(addr, {})[session] = None
        now = self.clock()
        due = now + wait
        armed = session.auth_wait_until
        if armed is not None and now < armed <= due + 0.001:
            return  # a timer that fires soon enough is armed already
        session.auth_wait_until = due
        if self.call_later is not None:
            # (a loop's timer may fire a hair early: the budget is asked again, and says how long)
            self.call_later(wait + 0.001, lambda: self._timer(session, due))

    def _timer(self, session: Session, due: float) -> None:
        if session.auth_wait_until == due:
            session.auth_wait_until = None
        if not session.closed:
            session.resume()

    def _unpark(self, session: Session, addr: str) -> None:
        session.auth_wait_until = None
        parked = self._parked.get(addr)
        if parked is not None:
            parked.pop(session, None)
            if not parked:
                del self._parked[addr]

    def _forget(self, session: Session) -> None:
        """The client went away: it waits for nothing any more (a check it began still settles)."""
        self._checking.discard(session)
        self._unpark(session, budget_key(_host(session.peer)))

    def _handshake_reply(self, session: Session, error: bool, data: bytes) -> None:
        """A reply to the proxy's own AUTH/SELECT (or to the HELLO that carried its AUTH)."""
        session.up_pending -= 1
        if error:
            text = data[1:].strip().decode("utf-8", "replace")
            if credentials_refused(data):
                session.up_refused = True
                if self.on_upstream_auth_error is not None:
                    self.on_upstream_auth_error(text or "the upstream refused HELLO AUTH")
            elif not session.up_refused:
                session.up_refused = data  # (a connection limit, say: the client gets the server's words)
                if self.on_upstream_rejected is not None:
                    self.on_upstream_rejected(text)
        if session.up_pending > 0:
            return
        if session.up_refused:
            # fail closed: nothing of the client's is sent on a connection that is not the proxy's
            session.refuse(UPSTREAM_REFUSED if session.up_refused is True else session.up_refused)
            return
        session.up_ready = True
        if self.on_upstream_auth_ok is not None:
            self.on_upstream_auth_ok()
        session.resume()


def budget_key(host: str) -> str:
    """Whose failed-login budget a client spends: its IPv4 address, its IPv6 /64 (one host usually
    has a whole /64 to pick addresses from), or "unix" for unix-socket clients."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def _host(peer: str) -> str:
    # peer is str(peername): "('127.0.0.1', 5555)" or a unix path
    if peer.startswith("("):
        return peer[1:].split(",", 1)[0].strip("'\"")
    return peer or "unix"


__all__ = ["Gate", "encode_handshake"]
