"""The policy chain a Session consults for each command: client authentication and upstream
credentials first (proxy.auth), then caps and rate limits (proxy.limits). A plain object: time and
background work come in as injected callables, so tests drive it without an event loop."""

from __future__ import annotations

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
from .resp import encode_command, encode_error
from .session import Admission, Session

log = logging.getLogger("respmeter.gate")

FORWARD = (Admission.FORWARD, None, "")
OK = b"+OK\r\n"


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
    ) -> None:
        self.verifier = verifier
        self.upstream_auth = upstream_auth if upstream_auth is not None and upstream_auth.active else None
        self.limits = limits
        self.throttle = throttle or FailureThrottle(clock=clock)
        self.call_later = call_later
        self.clock = clock
        self.on_upstream_auth_error = on_upstream_auth_error
        self.on_upstream_auth_ok = on_upstream_auth_ok
        # answer a client's AUTH locally (never forward its credentials)?
        self.intercept_auth = verifier is not None or self.upstream_auth is not None

    # -- Session policy protocol --------------------------------------------------------------
    def init_session(self, session: Session) -> None:
        session.authed = self.verifier is None
        session.up_ready = self.upstream_auth is None
        if self.limits is not None:
            self.limits.init_session(session)

    def fast_admit(self, session: Session, n: int) -> bool:
        if not (session.authed and session.up_ready):
            return False
        return self.limits is None or self.limits.fast_admit(session, n)

    def fast_refund(self, session: Session, n: int) -> None:
        if self.limits is not None:
            self.limits.fast_refund(session, n)

    def admit(self, session: Session, args: list[bytes], info: Any, name: str) -> tuple[int, Any, str]:
        if self.intercept_auth or not session.authed:
            verdict = self._auth(session, args, name)
            if verdict is not None:
                return verdict
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
        if self.limits is not None:
            verdict = self.limits.admit(session, args, info, name, len(handshake))
            if verdict is not None:
                return verdict
        if merge_into_hello:
            session.up_ready = True
            assert hello_args is not None and self.upstream_auth is not None
            new = hello_args[:2] + self.upstream_auth.hello_auth() + hello_args[2:]
            session.hello_auth_check = self._handshake_reply
            self._after_reset(session, name)
            return Admission.REPLACE, encode_command(new), ""
        prefix = b""
        if handshake:
            session.up_ready = True
            prefix = b"".join(session.push_internal(c, self._handshake_reply) for c in handshake)
        self._after_reset(session, name)
        if hello_args is not None and hello_args != args:
            return Admission.REPLACE, prefix + encode_command(hello_args), ""
        if prefix:
            return Admission.PREFIX, prefix, ""
        return FORWARD

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
                verdict = self._login(session, creds[0], creds[1], None)
                if verdict is not None:
                    return verdict
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
        """Check a client's credentials. None: accepted and the command goes on (HELLO)."""
        if self.verifier is None:
            # No proxy users: the upstream credentials are the proxy's; accept and answer locally.
            return (Admission.REPLY, ok_reply, "local") if ok_reply is not None else None
        result = self.verifier.check(user, password, session.resume)
        if result is None:
            return Admission.WAIT, None, ""
        addr = _host(session.peer)
        if not result:
            now = self.clock()
            if session.auth_wait_until is None:
                delay = self.throttle.delay(addr)
                if delay > 0 and self.call_later is not None:
                    session.auth_wait_until = now + delay
                    self.call_later(delay, session.resume)
                    return Admission.WAIT, None, ""
            elif now < session.auth_wait_until:
                # a timer may fire a little early (loop clocks are coarse): arm it again
                if self.call_later is not None:
                    self.call_later(session.auth_wait_until - now + 0.001, session.resume)
                return Admission.WAIT, None, ""
            session.auth_wait_until = None
            self.throttle.failed(addr)
            log.info("authentication failed for user %r from %s", user.decode("utf-8", "replace")[:64], addr)
            return Admission.REPLY, WRONGPASS, "rejected:auth_failed"
        self.throttle.succeeded(addr)
        u = self.verifier.users[user.decode("utf-8", "replace")]
        session.authed = True
        session.set_user(u.label)
        return (Admission.REPLY, ok_reply, "local") if ok_reply is not None else None

    def _handshake_reply(self, error: bool, data: bytes) -> None:
        if error:
            if self.on_upstream_auth_error is not None:
                text = data[1:].strip().decode("utf-8", "replace") or "the upstream refused HELLO AUTH"
                self.on_upstream_auth_error(text)
        elif self.on_upstream_auth_ok is not None:
            self.on_upstream_auth_ok()


def _host(peer: str) -> str:
    # peer is str(peername): "('127.0.0.1', 5555)" or a unix path
    if peer.startswith("("):
        return peer[1:].split(",", 1)[0].strip("'\"")
    return peer or "unix"


__all__ = ["Gate", "encode_handshake"]
