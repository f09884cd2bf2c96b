"""One client connection's logic, with no I/O in it.

A :class:`Session` is fed bytes from the client and from its upstream connection and calls the sinks it
was given to send bytes on. It frames both directions, pairs every reply with its request (pub/sub
messages and RESP3 pushes are never paired), tracks the connection state that changes framing or
counting (protocol version, subscriptions, MULTI, MONITOR, CLIENT REPLY), and counts every command.

Counting rules, chosen so that the upstream count equals the server's ``INFO commandstats``
(calls + rejected_calls):

* a command is counted upstream when it is written upstream;
* a command written while the client is inside MULTI is counted when its fate is known: at once if it
  is rejected while queueing (an error reply), when EXEC runs the transaction, never if the
  transaction is discarded or aborted (the server never runs it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import commands as cmdtable
from . import resp, streaming
from .clientend import ClientEnd
from .handshake import RECORDED, REWRITTEN_NAMES, rewrite
from .metrics import C_HISTOGRAM, PROXY_CLIENT, Stats
from .paths import (
    BLOCKING_NAMES,
    NOT_DEFERRED,
    SPECIAL,
    STREAMABLE,
    SUBSCRIBE_CMDS,
    UNTIMED,
    block_timeout,
    fast_sets,
)
from .resp import (
    CONFIRM_KINDS,
    KIND_ARRAY,
    KIND_ERROR,
    KIND_PUSH,
    MESSAGE_KINDS,
    ProtocolError,
    RequestParser,
    encode_command,
    encode_error,
    expand,
)
from .entries import INTERNAL, LOCAL, RELAY_CLIENT, RELAY_UPSTREAM, UPSTREAM, Admission, Pending
from .streaming import StreamedRequest
from .quotaerrors import UPSTREAM_REFUSED, QuotaErrors, credentials_refused
from .subscriptions import Subscriptions

# what clients send at connect and ignore the errors of (redis-py: CLIENT SETINFO, and in newer
# versions CLIENT MAINT_NOTIFICATIONS): a connection that could not be served stays open after
# answering only these, so that the client's next command gets the error too (see _reject_all)
SWALLOWED = frozenset({"client|setinfo", "client|maint_notifications"})

# pub/sub messages the proxy delivers itself that a client may leave unread (Redis's own
# client-output-buffer-limit for pub/sub clients: 32mb hard)
PUSH_LIMIT = 32 * 1024 * 1024


def _valid_name(name: bytes) -> bool:
    """Redis accepts client names of printable ASCII without spaces (or empty, to clear)."""
    return all(33 <= c <= 126 for c in name)


class Session:
    """Per-connection proxy logic. The I/O layer supplies the sinks and calls the ``on_*`` methods."""

    # verdicts, for the session's helpers (proxy.streaming)
    WAIT = Admission.WAIT
    PREFIX = Admission.PREFIX
    REPLACE = Admission.REPLACE

    def __init__(
        self,
        stats: Stats,
        send_client: Callable[[bytes], None],
        close_client: Callable[[], None],
        *,
        listener: str | None = None,
        peer: str = "",
        max_bulk: int | None = None,
        max_query: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        policy: Any = None,
    ) -> None:
        self.stats = stats
        self._send_client = send_client
        self._close_client = close_client
        self._send_upstream: Callable[[bytes], None] | None = None
        self._close_upstream: Callable[[], None] | None = None
        self.peer = peer
        self.listener = listener
        self.clock = clock
        self.policy = policy
        kw = {}
        if max_bulk is not None:
            kw["max_bulk"] = max_bulk
        if max_query is not None:
            kw["max_query"] = max_query
        tracker = stats.patterns
        # commands the policy must see one by one (proxy.gate: the denied ones): never on the fast path
        self.slow_names: frozenset[str] = getattr(policy, "slow_names", None) or frozenset()
        self.book = getattr(policy, "handshake", None)  # proxy.handshake.HandshakeBook
        plain, self._stop = fast_sets(self.slow_names)
        self.parser = RequestParser(
            **kw, names=plain, fast=tracker.fast if tracker is not None else None, streamable=STREAMABLE
        )
        self.stream = StreamedRequest(self)  # a large request forwarded as it arrives
        self.parser.stream_ok = self.stream.allowed
        self.framer = resp.ReplyFramer()
        # Awaiting a reply, in order: ``n`` plain commands sent together are one tuple
        # (name, client, t0, timed, n), anything needing more (state changes, MULTI, local answers,
        # the proxy's own commands) a Pending.
        self.pending: deque[Any] = deque()
        self.waiting: deque[tuple[list[bytes], bytes]] = deque()  # parsed, not yet dispatched
        self.waiting_bytes = 0  # request bytes queued in ``waiting`` (reset when it empties)
        self.queued = 0  # commands the tuple entries of ``pending`` stand for
        self.n_special = 0  # LOCAL and INTERNAL entries in ``pending``
        self.internal_buf = bytearray()  # the reply of the INTERNAL (or captured) entry at the head
        # identity
        self.user: str | None = None  # authenticated proxy user (set by the policy layer)
        self.name: bytes | None = None  # CLIENT SETNAME / HELLO SETNAME
        self.client = self._compute_label()
        # server-side state, as established by replies (exact)
        self.protocol = 2
        self.in_multi = False
        self.tx_queued: list[tuple[str, str]] = []
        self.tx_name: bytes | None = None  # a CLIENT SETNAME queued in MULTI: applied by EXEC
        self.tx_reply: bytes | None = None  # the last CLIENT REPLY mode queued in MULTI: EXEC applies it
        self.subs = Subscriptions(self)  # pub/sub state, from the server's confirmations
        self.monitor = False
        # client-side view at send time (what the next command will be sent under)
        self.multi_view = False
        self.reply_off = False
        self.reply_skip = False
        # lifecycle
        self.connected = False
        self.closing = False  # close the client once everything pending is answered
        self.quitting = False  # QUIT was sent (or answered): nothing after it is read
        self.closed = False
        self.held = False  # dispatch is holding (policy WAIT)
        # set by the policy layer (proxy.gate): client authenticated to the proxy; upstream
        # connection authenticated (or being) with the proxy's credentials
        self.authed = True  # (a property: kept by the parser, which applies the limits before AUTH)
        self.up_ready = True
        self.auth_wait_until: float | None = None
        self.close_after_reply = False
        # set by proxy.limits
        self.tx_spare = 0  # cap budget kept for the EXEC/DISCARD of an open transaction
        self.tx_spare_client = ""  # ... taken from this identity's pools (refunded to it)
        self.tx_doomed = False  # a queued command hit the cap: EXEC will discard
        # set by proxy.gate
        self.tx_denied = False  # a queued command was denied: EXEC will discard
        self.idle_until: float | None = None  # on_cap = "idle": when the held blocking command answers
        self.throttle_noted = False  # the held command was counted in respmeter_throttled_total
        self.hold_limit: int | None = None  # while held for a rate limit: most commands that may wait
        self.hold_reject = b""
        self.on_close: list[Callable[[], None]] = []
        self.hello_auth_check: Callable[[bool, bytes], None] | None = None  # HELLO carrying the proxy's AUTH
        self.fail_msg: bytes | None = None  # the upstream failed before the client said anything
        # set by the I/O layer: the upstream connection is opened only when this is called (after
        # the client authenticated, when proxy users are configured); None: it is opened at once
        self.request_upstream: Callable[[], None] | None = None
        self.wake: Callable[[], None] | None = None  # told after held commands were dispatched
        self.got_reply = False  # the upstream has sent RESP on this connection
        self.last_reply_at = 0.0  # when it last sent anything (for stall detection)
        self.quota_errors = QuotaErrors(stats)  # the upstream's "quota used up" errors
        self.push_buf = b""  # pub/sub messages of the proxy's own waiting for a frame boundary
        self.client_buffered: Callable[[], int] | None = None  # bytes the client has yet to read
        # set by a policy that must see the end: True keeps the upstream connection open after
        # the client went (until what is pending there is answered; proxy.pollhold)
        self.on_client_gone: Callable[[Session], bool] | None = None
        self.lingering = False  # the client went; the upstream connection stays until it is done
        self.parked = False  # a blocking command of the client is answered by the policy (PARK)
        self.draining = False  # the proxy is shutting down (proxy.server.Proxy.shutdown)
        self.drain_held = False  # ... and holds this client's blocking command, never to send it
        # upstream pooling (proxy.pool): replies asked of the upstream so far (each write carries
        # the ones asked since the last), the shared connection this session uses (None: its own)
        self.up_n = 0
        self.pool_link: Any = None
        self.pinned: str | None = None  # why it left the pool for a connection of its own
        self.pin_answer: bytes | None = None  # the reply to the AUTH that pinned it (sent first there)
        self.end = ClientEnd(self)  # the client's end, passed on upstream (see client_eof)
        if policy is not None:
            policy.init_session(self)

    @property
    def authed(self) -> bool:
        """The client has authenticated to the proxy (set by the policy layer, proxy.gate)."""
        return not self.parser.unauth

    @authed.setter
    def authed(self, value: bool) -> None:
        self.parser.unauth = not value

    # -- identity --------------------------------------------------------------------------
    def _compute_label(self) -> str:
        if self.user is not None:
            return self.user
        if self.listener is not None:
            return self.listener
        return self.stats.labels.label(self.name)

    def set_name(self, name: bytes) -> None:
        """The connection's name changed without a command going upstream (proxy.handshake)."""
        self.name = name or None
        self.client = self._compute_label()

    def set_user(self, user: str | None) -> None:
        self.user = user
        self.client = self._compute_label()

    # -- wiring ------------------------------------------------------------------------------
    def upstream_connected(
        self,
        send_upstream: Callable[[bytes], None],
        close_upstream: Callable[[], None],
        handshake: list[tuple[list[bytes], Callable[[bool, bytes], None] | None]] = (),
    ) -> None:
        """The upstream connection is up. ``handshake`` lists commands the proxy sends first on its
        own behalf (credentials, HELLO, SELECT), each with a callback for its reply."""
        self._send_upstream = send_upstream
        self._close_upstream = close_upstream
        self.connected = True
        if handshake:
            now = self.clock()
            out = []
            for item in handshake:
                args, cb = item[0], item[1]
                client = item[2] if len(item) > 2 else PROXY_CLIENT  # (a client's own command, proxy.pool)
                info = cmdtable.lookup(args)
                name = info.name if info is not None else cmdtable.UNKNOWN
                e = Pending(name, client, INTERNAL, now, None)
                e.on_reply = cb
                self.pending.append(e)
                self.n_special += 1
                self.up_n += 1
                self.stats.count_upstream(client, name)
                out.append(encode_command(args))
            self._write_upstream(b"".join(out))
        self._dispatch()

    def push_internal(
        self, args: list[bytes], on_reply: Callable[[bool, bytes], None] | None, client: str = PROXY_CLIENT
    ) -> bytes:
        """Queue a command the proxy sends on its own behalf (counted under client ``respmeter``, or
        ``client`` when it stands for a client's own command); returns its bytes, which the caller
        writes upstream in order (Admission.PREFIX). Its Pending entry is ``pending[-1]`` then."""
        info = cmdtable.lookup(args)
        name = info.name if info is not None else cmdtable.UNKNOWN
        e = Pending(name, client, INTERNAL, self.clock(), None)
        e.on_reply = on_reply
        if name in SPECIAL:
            e.args = args
            if name in ("discard", "exec", "reset"):
                self.multi_view = False
        self.pending.append(e)
        self.n_special += 1
        self.up_n += 1
        self.stats.count_upstream(client, name)
        return encode_command(args)

    def send_internal(
        self, args: list[bytes], on_reply: Callable[[bool, bytes], None] | None, client: str = PROXY_CLIENT
    ) -> Pending:
        """Send a command on the proxy's own behalf now (see push_internal); its Pending entry."""
        data = self.push_internal(args, on_reply, client)
        e = self.pending[-1]
        self._write_upstream(data)
        return e

    def late_reply(self, reply: bytes) -> None:
        """The reply to a command the policy parked (Admission.PARK): nothing the client sees is
        pending before it (proxy.pollhold parks only then), so it goes now; then what waited goes."""
        self._write_client(reply)
        self.resume()

    def push_local(self, frame: bytes) -> None:
        """A pub/sub message the proxy delivers itself (proxy.events), at the next frame boundary of
        what the upstream sends this client. A client that lets more than PUSH_LIMIT of them pile
        up is closed, as Redis closes a pub/sub client past its output buffer limit."""
        if self.closed or self.lingering:
            return
        self.stats.pushes += 1
        if self.framer.in_frame or self.push_buf:
            self.push_buf += frame
        else:
            self._write_client(frame)
        buffered = len(self.push_buf) + (self.client_buffered() if self.client_buffered is not None else 0)
        if buffered > PUSH_LIMIT:
            self.push_buf = b""
            self.lingering = True  # nothing more is written to it
            self._abandon()
            self._ended()
            self.closed = True
            if self._close_upstream is not None:
                self._close_upstream()
            self._close_client()

    def upstream_failed(self, reason: str) -> None:
        """The upstream connection could not be made (or broke before its first reply): every command
        gets an error, in order, then the connection closes. A client that has not sent anything yet
        gets the error for its first command."""
        if reason.startswith("upstream TLS:"):
            msg = encode_error("ERR " + reason)
        else:
            msg = encode_error("ERR upstream unavailable: " + reason)
        self.refuse(msg)

    def refuse(self, msg: bytes) -> None:
        """There is no upstream connection for this client: every command gets ``msg``, in order
        (the first one, if it has sent nothing yet), then the connection closes."""
        self.connected = False
        self._send_upstream = None
        if not self.waiting and not self.pending:
            self.fail_msg = msg
            return
        self._reject_all(msg)

    def _reject_all(self, msg: bytes) -> None:
        out = []
        answered = set()  # the names of what was answered
        for e in self.pending:  # forwarded, never answered
            if type(e) is tuple:
                self.stats.count_command(e[1], e[0], "error", e[4])
                out.extend([msg] * e[4])
                answered.add(e[0])
            elif e.kind == LOCAL:
                out.append(e.reply)  # type: ignore[arg-type]
                answered.add(e.name)
            elif e.kind == UPSTREAM:
                self.stats.count_command(e.client, e.name, "error")
                if e.expect != 0:
                    out.append(msg)
                answered.add(e.name)
        self.pending.clear()
        self.queued = 0
        self.n_special = 0
        while self.waiting:
            entry = self.waiting.popleft()
            args, raw = entry[0], entry[1]
            if not args:
                if len(entry) == 3:  # a command refused while waiting (rate-limit queue full)
                    self.stats.count_command(self.client, entry[2], "rejected:rate_limit_queue_full")
                    out.append(msg)
                    answered.add(entry[2])
                    continue
                out.append(raw)  # a queued protocol error
                answered.add("")
                break
            name = cmdtable.command_name(args)
            self.stats.count_command(self.client, name, "rejected:upstream_unavailable")
            out.append(msg)
            answered.add(name)
        if out:
            self._write_client(b"".join(out))
        self.held = False  # nothing is held any more: it was all answered
        if answered and answered <= SWALLOWED and self.parser.error is None and not self.closing:
            # only commands whose errors clients ignore (redis-py's CLIENT SETINFO at connect):
            # the connection stays for the next one, which gets the error too, and then closes
            # (else the client would find it closed, and say only that)
            self.fail_msg = msg
            return
        self.closing = True
        self._maybe_close()

    # -- client side -------------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        if self.closing or self.closed or self.quitting:
            return
        self.stats.bytes["from_client"] += len(data)
        parser = self.parser
        cmds, raw = parser.feed(data)
        if parser.pre is not None:
            self.stream.more()
        if self.fail_msg is not None:
            for args, _s, _e in expand(cmds, raw):
                self.waiting.append((args, b""))
            if self.waiting or self.parser.error is not None:
                self._reject_all(self.fail_msg)
            return
        if cmds:
            if self.monitor:
                self._passthrough_commands(expand(cmds, raw), raw)
            elif not self.waiting and self.connected and not self.held:
                self._dispatch_batch(cmds, raw)
            else:
                waiting = self.waiting
                limit = self.hold_limit if self.held else None
                for args, s, e in expand(cmds, raw):
                    if limit is not None and len(waiting) >= limit:
                        # a rate-limit queue is full: answer in order, keep no arguments
                        waiting.append(([], self.hold_reject, cmdtable.command_name(args)))
                    else:
                        waiting.append((args, raw[s:e]))
                self.waiting_bytes += len(raw)
                self._dispatch()
        if parser.head is not None:
            self.stream.begin()
        if self.parser.error is not None:
            if self.stream.state:
                # broken inside a streamed request: the upstream holds part of it, so no reply
                # will come for it (or after it): everything pending gets the error, and both
                # connections close
                self.stream.state = streaming.IDLE
                self.stats.protocol_errors += 1
                self._reject_all(encode_error("ERR " + self.parser.error))
                return
            self.stats.protocol_errors += 1
            err = encode_error("ERR " + self.parser.error)
            if self.waiting or not self.connected:
                # Answer after the commands still waiting, then close.
                self.waiting.append(([], err))
                if self.connected or (not self.authed and self.request_upstream is not None):
                    self._dispatch()  # (before AUTH, with no upstream yet, the proxy answers)
                else:
                    self.closing = True
            else:
                self._answer(err, None, None)
                self.closing = True
        if self.closing:
            self._maybe_close()

    def _ended(self) -> None:
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            hook()

    def client_eof(self) -> bool:
        """The client will send nothing more (proxy.clientend): True keeps the connection until
        what is owed to it is written, False closes it now."""
        return self.end.eof()

    def client_closed(self) -> None:
        """The client went away: its upstream connection is closed at once, unless the policy has
        business left on it (proxy.pollhold: an item to give back); then it closes once that is
        done (see :meth:`lingers`)."""
        if self.on_client_gone is not None and not self.closed and self.on_client_gone(self):
            self.lingering = True
            self.closing = True
            self.held = False
            self.waiting.clear()
            self.push_buf = b""
            self._maybe_close()
            return
        self._ended()
        self.closed = True
        if self._close_upstream is not None:
            self._close_upstream()
        self._abandon()

    def _abandon(self) -> None:
        for e in self.pending:
            if type(e) is tuple:
                self.stats.count_command(e[1], e[0], "error", e[4])
            elif e.kind == UPSTREAM:
                self.stats.count_command(e.client, e.name, "error")
        self.pending.clear()
        self.queued = 0
        self.waiting.clear()
        self.n_special = 0

    @property
    def backlog(self) -> int:
        """Commands held by this session (waiting, or awaiting a reply; bytes held count 1 per 256):
        the I/O layer pauses reading from the client while this is large."""
        n = len(self.waiting) + len(self.pending) + self.queued + (self.waiting_bytes >> 8)
        if not self.connected or self.held:
            # nothing can go yet (the upstream connection is being opened, a rate limit or an
            # AUTH check holds us): a large request is not streamed, so what it holds counts too
            n += self.parser.buffered >> 8
        return n + streaming.HELD_BACKLOG if self.stream.state == streaming.HELD else n

    @property
    def awaiting_upstream(self) -> bool:
        """Some reply is still to come from the upstream (not only local answers)."""
        return any(type(e) is tuple or e.kind != LOCAL for e in self.pending)

    # -- dispatch ------------------------------------------------------------------------------
    def admit(self, args: list[bytes], info: Any, name: str) -> tuple[int, Any, str]:
        """Policy hook: (Admission.FORWARD, None, "") or (REPLY, bytes, outcome) or (WAIT, None, "")."""
        if self.policy is None:
            return Admission.FORWARD, None, ""
        return self.policy.admit(self, args, info, name)

    def _dispatch_batch(self, cmds: list[Any], raw: bytes) -> None:
        """Fast path: a batch straight from the parser (commands and runs, see RequestParser) with
        nothing waiting before it."""
        now = self.clock()
        self.hold_limit = None
        start = 0
        if (
            not (self.multi_view or self.reply_off or self.reply_skip)
            and (self.policy is None or self.policy.fast_admit(self, self.parser.framed))
        ):
            # Plain commands only (the usual pipeline): no policy verdicts, counted in runs.
            client = self.client
            stats = self.stats
            upstream = stats.upstream
            tracker = stats.patterns
            it = cmds[0]
            if len(it) == 5 and len(cmds) == 1:
                # one run of plain commands (the usual read): it goes upstream first and is
                # accounted for after, off the round trip's path (its replies come in a later
                # callback); the loop below does the same for any batch
                n = it[2]
                self.queued += n
                self.up_n += n
                send = self._send_upstream
                if send is not None:  # (_write_upstream, inlined: raw is never empty here)
                    stats.bytes["to_upstream"] += len(raw)
                    send(raw)
                name, timed = it[0]
                self.pending.append((name, client, now, timed, n))
                key = (client, name)
                upstream[key] = upstream.get(key, 0) + n
                if tracker is not None:
                    tcur = tracker.cur
                    tkey = (client, name, it[1])
                    tcur[tkey] = tcur.get(tkey, 0) + n
                return
            pending = self.pending
            tcur = tracker.cur if tracker is not None else None
            stop = self._stop
            last = None  # the entry this batch appended last: equal neighbours share one
            done = 0
            for it in cmds:
                if len(it) == 5:  # a run of plain commands framed in C
                    name, timed = it[0]
                    pat = it[1]
                    n = it[2]
                else:
                    args = it[0]
                    info = cmdtable.lookup(args)
                    if info is None:
                        name = cmdtable.UNKNOWN
                        timed = True
                    else:
                        name = info.name
                        timed = not info.blocking
                    if name in stop:
                        break
                    pat = tracker.pattern(name, info, args) if tracker is not None else None
                    n = 1
                if last is not None and last[0] == name and last[3] is timed:
                    last = (name, client, now, timed, last[4] + n)
                    pending[-1] = last
                else:
                    last = (name, client, now, timed, n)
                    pending.append(last)
                key = (client, name)
                upstream[key] = upstream.get(key, 0) + n
                if tcur is not None:
                    tkey = (client, name, pat)
                    tcur[tkey] = tcur.get(tkey, 0) + n
                done += n
                start += 1
            self.queued += done
            self.up_n += done
            if start == len(cmds):
                self._write_upstream(raw)
                return
            if self.policy is not None:
                self.policy.fast_refund(self, self.parser.framed - done)
        cmds = expand(cmds[start:], raw)
        # the run of forwarded bytes not yet written starts at the beginning: the commands already
        # accounted for above go with it
        send_from = 0
        end = len(raw)
        i = 0
        for args, s, e in cmds:
            if not self.connected:
                # the command before took the session off its connection (a pooled client's HELLO
                # that changed its protocol: proxy.pool): the rest waits for the next one
                for rest in cmds[i:]:
                    self.waiting.append((rest[0], raw[rest[1] : rest[2]]))
                send_from = end = len(raw)
                break
            verdict = self._route(args, now)
            if verdict is None:
                i += 1
                if self.quitting:  # the server reads nothing after QUIT
                    end = e
                    break
                continue
            # Not forwarded as is: write the run before it, then handle it.
            if s > send_from:
                self._write_upstream(raw[send_from:s])
            send_from = e
            kind, payload = verdict
            if kind == Admission.PREFIX:
                self._write_upstream(payload)
                send_from = s  # the command itself goes with the next run
                i += 1
                if self.quitting:
                    end = e
                    break
                continue
            if kind == Admission.WAIT:
                for rest in cmds[i:]:
                    self.waiting.append((rest[0], raw[rest[1] : rest[2]]))
                send_from = len(raw)
                self.held = True
                self._enforce_hold_limit()
                break
            if kind == Admission.REPLACE:
                self._write_upstream(payload)
            i += 1
            if self.quitting:
                end = send_from
                break
        if send_from < end:
            self._write_upstream(raw[send_from:end] if send_from or end < len(raw) else raw)
        if self.waiting and not self.connected:
            if self.fail_msg is not None:  # (refused meanwhile: no connection will come)
                self._reject_all(self.fail_msg)
            elif not self.held:
                self._dispatch()  # (asks for the connection they wait for)

    def _dispatch(self) -> None:
        """Slow path: dispatch what is waiting, in order, until something must wait."""
        if self.closed:
            return
        if not self.connected and (self.authed or self.request_upstream is None):
            self._want_upstream()
            return
        # connected, or not authenticated yet (and with no upstream connection until then: the
        # proxy answers everything itself, see proxy.gate)
        self.held = False
        self.hold_limit = None  # set again by the policy if a rate limit holds us once more
        now = self.clock()
        out: list[bytes] = []
        waiting = self.waiting
        while waiting:
            entry = waiting[0]
            args, raw = entry[0], entry[1]
            if not args and len(entry) == 3:  # refused while waiting (rate-limit queue full)
                waiting.popleft()
                self.stats.count_command(self.client, entry[2], "rejected:rate_limit_queue_full")
                if not self.reply_off or self.multi_view:  # (as in _route)
                    self._answer(raw, entry[2], self.client)
                continue
            if not args:  # a queued protocol error: answer it, then close
                waiting.popleft()
                if out:
                    self._write_upstream(b"".join(out))
                    out = []
                self._answer(raw, None, None)
                self.closing = True
                waiting.clear()
                break
            if not self.connected and self.authed:
                break  # authenticated just now: the rest goes upstream, once there is one
            if len(entry) == 4 and self.pool_link is not None:
                # the head of a streamed request, still on a shared connection: it goes once the
                # session has a connection of its own (its bytes must not mix with others')
                self.pool_link.pin("large request")
                self.held = True
                break
            verdict = self._route(args, now)
            if len(entry) == 4:  # the head of a streamed request (the last entry)
                if verdict is not None and verdict[0] == Admission.WAIT:
                    self.held = True
                    break
                waiting.popleft()
                if out:
                    self._write_upstream(b"".join(out))
                    out = []
                self.stream.go(verdict, raw)
                continue
            if verdict is None:
                waiting.popleft()
                out.append(raw)
                if self.quitting:
                    waiting.clear()
                    break
                continue
            kind, payload = verdict
            if kind == Admission.WAIT:
                self.held = True
                self._enforce_hold_limit()
                break
            waiting.popleft()
            if kind == Admission.REPLACE:
                out.append(payload)
            elif kind == Admission.PREFIX:
                out.append(payload)
                out.append(raw)
            if self.quitting:  # nothing after QUIT is read by the server
                waiting.clear()
                break
        if out:
            self._write_upstream(b"".join(out))
        if not waiting:
            self.waiting_bytes = 0
        if not self.connected and self.authed:
            self._want_upstream()
        if self.end.due:
            self.end.pass_on()
        self._maybe_close()
        if self.wake is not None:
            self.wake()

    def _want_upstream(self) -> None:
        request, self.request_upstream = self.request_upstream, None
        if request is not None and not self.closed:
            request()

    def _enforce_hold_limit(self) -> None:
        """Held by a rate limit: commands beyond its queue bound (the held one included in the count)
        are refused in their turn, keeping no arguments."""
        limit = self.hold_limit
        waiting = self.waiting
        if limit is None or len(waiting) <= limit:
            return
        for i in range(limit, len(waiting)):
            entry = waiting[i]
            if entry[0] and len(entry) != 4:  # (a streamed request's head waits its turn)
                waiting[i] = ([], self.hold_reject, cmdtable.command_name(entry[0]))

    def resume(self) -> None:
        """Called by the policy layer when a held command may be looked at again."""
        if self.held:
            self._dispatch()

    def _route(self, args: list[bytes], now: float) -> tuple[int, Any] | None:
        """Decide one command. None: forward its bytes as they are (already accounted)."""
        info = cmdtable.lookup(args)
        name = info.name if info is not None else cmdtable.UNKNOWN
        client = self.client
        replaced = None
        watch = None
        if self.policy is not None:
            kind, payload, outcome = self.policy.admit(self, args, info, name)
            if kind == Admission.WAIT:
                return Admission.WAIT, None
            if kind == Admission.REPLY:
                if outcome:  # (empty: the policy counted it, proxy.savers)
                    self.stats.count_command(client, name, outcome)
                if not self.reply_off or self.multi_view or name == "reset":
                    # (CLIENT REPLY OFF: no reply at all, errors included, as on Redis; RESET turns
                    # replies back on, and is answered; inside MULTI a CLIENT REPLY OFF is only
                    # queued. After CLIENT REPLY SKIP the proxy's reply takes the place of the next
                    # one: the server, which did not see this command, skips the next it sees)
                    self._answer(payload, name, client)
                if self.close_after_reply:
                    self.closing = True
                if name == "quit":
                    self.quitting = True
                return Admission.REPLY, None
            if kind == Admission.INJECT_REPLY:
                upstream_bytes, reply, outcome = payload
                self.stats.count_command(client, name, outcome)
                self._answer(reply, name, client)
                return Admission.REPLACE, upstream_bytes
            if kind == Admission.PARK:
                return Admission.REPLY, None
            if kind == Admission.WATCH:
                watch = payload
            elif kind != Admission.FORWARD:
                replaced = (kind, payload)
            client = self.client  # the policy may have changed the identity (AUTH)
        tracker = self.stats.patterns
        if tracker is not None:
            tracker.add(client, name, tracker.pattern(name, info, args))
        silent = self.reply_off or self.reply_skip  # CLIENT REPLY OFF / SKIP: no reply to this one
        blocking = name in BLOCKING_NAMES
        book = self.book
        # (not under CLIENT REPLY OFF/SKIP: the server sends no reply, and an empty one is no answer)
        capture = (book is not None and name in RECORDED and not self.multi_view and not silent
                   and book.wants(name, args))
        if watch is not None:
            capture = True
        if not (silent or self.multi_view or blocking or capture or name in SPECIAL):
            # the common case: a plain entry
            self.stats.count_upstream(client, name)
            self.pending.append((name, client, now, True, 1))
            self.queued += 1
            self.up_n += 1
            return replaced
        e = Pending(name, client, UPSTREAM, now, None)
        if self.multi_view and name not in NOT_DEFERRED:
            e.deferred = True
        else:
            self.stats.count_upstream(client, name)
        self.reply_skip = False
        if name in SPECIAL:
            self._special_send(e, args)
        elif blocking:
            e.timed = False
            # when its reply is due at the latest (an upstream that says nothing by then stalls)
            timeout = block_timeout(name, args)
            e.deadline = now + timeout if timeout else None
        if capture:
            e.capture = args  # its reply bytes are kept (internal_buf) and recorded
            e.on_reply = watch
            self.n_special += 1
        if silent and not (name == "client|reply" and e.expect == 1):
            e.expect = 0
        if e.expect != 0:
            self.up_n += 1
        if e.expect == 0 and not self.pending:
            self._complete(e, False, now)
        else:
            self.pending.append(e)
        return replaced

    def _special_send(self, e: Pending, args: list[bytes]) -> None:
        name = e.name
        e.args = args
        e.timed = name not in UNTIMED
        if name in SUBSCRIBE_CMDS:
            e.expect = None  # decided when it reaches the head (MULTI or not, how many channels)
            if self.multi_view:
                self.subs.queued_in_multi()
        elif name == "multi":
            self.multi_view = True
        elif name in ("exec", "discard", "reset"):
            self.multi_view = False
            if name == "reset":
                self.reply_off = self.reply_skip = False
            elif name == "exec" and self.tx_reply is not None:
                # a CLIENT REPLY queued in the transaction acts when EXEC runs it: what follows EXEC
                # is looked at (and its replies expected) before EXEC's reply comes, so from here
                # (a transaction WATCH aborts would not have run it: not told apart)
                self._reply_mode(self.tx_reply)
            self.tx_reply = None
        elif name == "client|setname" and len(args) == 3 and _valid_name(args[2]):
            self._rename(e, args[2])
        elif name == "hello":
            for i in range(2, len(args) - 1):
                if args[i].lower() == b"setname" and _valid_name(args[i + 1]):
                    self._rename(e, args[i + 1])
        elif name == "quit":
            self.quitting = True  # what the client sends after it is neither forwarded nor counted
        elif name == "client|reply" and len(args) >= 3:
            mode = args[2].lower()
            if self.multi_view:
                self.tx_reply = mode  # (only queued: answered QUEUED, acts at EXEC)
                return
            e.expect = self._reply_mode(mode)

    def _reply_mode(self, mode: bytes) -> int:
        """CLIENT REPLY ``mode`` takes effect: how many replies the command itself gets."""
        if mode == b"off":
            self.reply_off = True
            return 0
        if mode == b"skip":
            if not self.reply_off:
                self.reply_skip = True
            return 0
        if mode == b"on":
            self.reply_off = self.reply_skip = False
        return 1

    def _rename(self, e: Pending, name: bytes) -> None:
        if self.multi_view:
            # queued: the server renames the connection when EXEC runs it, and until then every
            # command (the transaction's too) is charged to the name it has now
            self.tx_name = name
            return
        # the server runs what follows under the new name: label it so now (undone on error)
        e.reply = self.name or b""
        self.name = name or None
        self.client = self._compute_label()

    def _answer(self, reply: bytes, name: str | None, client: str | None) -> None:
        """Queue a local reply behind everything still pending (or send it now)."""
        if not self.pending:
            self._write_client(reply)
            return
        e = Pending(name or "", client or "", LOCAL, 0.0, None)
        e.reply = reply
        self.pending.append(e)
        self.n_special += 1

    def _passthrough_commands(self, cmds: list[tuple[list[bytes], int, int]], raw: bytes) -> None:
        # MONITOR mode: replies cannot be told from the monitor stream; count and pass bytes through.
        slow = self.slow_names
        out: list[bytes] = []
        sent = 0  # raw up to here is in out
        for args, s, e in cmds:
            name = cmdtable.command_name(args)
            if name in slow and self.policy.deny_reply(args, name) is not None:
                # its refusal has no place in the monitor stream: what came before it goes, then the
                # connection closes
                out.append(raw[sent:s])
                self._write_upstream(b"".join(out))
                self.stats.count_command(self.client, name, "rejected:denied")
                self.closing = True
                return
            new = rewrite(args, name) if name in REWRITTEN_NAMES else None
            if new is not None:  # (what never goes as sent: proxy.handshake.rewrite)
                out.append(raw[sent:s])
                out.append(encode_command(new))
                sent = e
            self.stats.count_upstream(self.client, name)
            self.stats.count_command(self.client, name, "ok")
        out.append(raw[sent:] if sent else raw)
        self._write_upstream(b"".join(out) if len(out) > 1 else out[0])

    # -- upstream side ----------------------------------------------------------------------------
    def whole_replies(self, data: bytes, n: int) -> None:
        """``n`` whole ordinary replies (no error, push or pub/sub-shaped array), framed already
        (proxy.pool): when they all answer the entry at the head of ``pending`` and nothing is
        special, they are passed on and paired here, without framing them again; otherwise they go
        the way of :meth:`upstream_data`."""
        pending = self.pending
        if (
            self.n_special
            or self.closed
            or not pending
            or self.internal_buf
            or self.push_buf
            or self.monitor
            or not self.got_reply
            or self.framer.in_frame
            or self.quota_errors.tail
        ):
            self.upstream_data(data)
            return
        h = pending[0]
        if type(h) is not tuple or h[4] < n:
            self.upstream_data(data)
            return
        if not self.lingering:
            self._send_client(data)  # first: what follows is off the round trip's path
            self.stats.bytes["to_client"] += len(data)
        now = self.clock()
        stats = self.stats
        stats.bytes["from_upstream"] += len(data)
        self.last_reply_at = now
        stats.last_reply_at = now
        name, client, t0, timed, c = h
        if c == n:
            pending.popleft()
        else:
            pending[0] = (name, client, t0, timed, c - n)
        self.queued -= n
        counts = stats.commands
        key = (client, name, "ok")
        counts[key] = counts.get(key, 0) + n
        if timed:
            h = stats.latency.get(name) if C_HISTOGRAM else None
            if h is not None:
                h.observe(now - t0, n)  # (one C call: Stats.observe_latency's work)
            else:
                stats.observe_latency(name, now - t0, n)
        if pending and type(pending[0]) is Pending and pending[0].expect == 0:
            self._drain_head(None, now)
        if self.closing:
            self._maybe_close()

    def upstream_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.stats.bytes["from_upstream"] += len(data)
        if self.monitor:
            self.stats.pushes += data.count(b"\r\n")
            self._write_client(data)
            return
        was_in_frame = self.framer.in_frame
        try:
            frames = self.framer.feed(data)
        except ProtocolError:
            # not a Redis server (an HTTP service, a TLS port): say what came back, to the client
            # and in the log, and count the upstream as failed
            self.stats.upstream_error("protocol")
            reason = resp.describe_non_resp(data)
            if self.stats.on_upstream_broken is not None:
                self.stats.on_upstream_broken(reason)
            self.refuse(encode_error("ERR " + reason))
            return
        now = self.clock()
        self.last_reply_at = now
        self.stats.last_reply_at = now
        if not self.got_reply:
            self.got_reply = True  # the first RESP from this connection: the upstream speaks it
            if self.stats.on_upstream_reply is not None:
                self.stats.on_upstream_reply()
            if not self.pending and data[:1] == b"-" and self.stats.on_upstream_refused is not None:
                # an error before anything was asked: the server refuses the connection (and closes
                # it). The client gets its words as it would straight from the server.
                self.stats.on_upstream_refused(data[1:].split(b"\r\n", 1)[0].decode("utf-8", "replace"))
        errors = False
        if self.n_special == 0 and not self.internal_buf:
            # Fast path: every byte goes to the client as it came.
            if self.push_buf and frames:  # the proxy's own pub/sub messages go at a boundary
                cut = frames[-1][0]
                self._write_client(data[:cut] + self.push_buf + data[cut:])
                self.push_buf = b""
            else:
                self._write_client(data)
            pending = self.pending
            stats = self.stats
            counts = stats.commands
            nf = len(frames)
            i = 0
            if self.framer.plain:
                # Ordinary replies only (no error, push or pub/sub-shaped array): pair them with the
                # plain entries at the head, a whole entry at a time.
                while i < nf and pending:
                    h = pending[0]
                    if type(h) is not tuple:
                        break
                    name, client, t0, timed, c = h
                    take = nf - i
                    if c <= take:
                        pending.popleft()
                        take = c
                    else:
                        pending[0] = (name, client, t0, timed, c - take)
                    i += take
                    self.queued -= take
                    key = (client, name, "ok")
                    counts[key] = counts.get(key, 0) + take
                    if timed:
                        stats.observe_latency(name, now - t0, take)
            if i < nf:
                # Runs of equal (command, client, outcome, send time) are counted once.
                run_key = None
                run_t0 = 0.0
                run_n = 0
                run_timed = False
                for fr in frames[i:] if i else frames:
                    k = fr[1]
                    if pending and type(pending[0]) is Pending and pending[0].expect == 0:
                        # (CLIENT REPLY OFF/SKIP, and what it silenced: no reply of theirs is in
                        # this read; the next frame is the next command's)
                        self._drain_head(None, now)
                    if k <= KIND_ERROR and pending and type(pending[0]) is tuple:
                        if k:
                            errors = True
                        name, client, t0, timed, c = pending[0]
                        if c > 1:
                            pending[0] = (name, client, t0, timed, c - 1)
                        else:
                            pending.popleft()
                        self.queued -= 1
                        if (
                            run_key is not None
                            and t0 == run_t0
                            and run_key[1] == name
                            and run_key[0] == client
                            and (run_key[2] == "error") == (k == KIND_ERROR)
                        ):
                            run_n += 1
                            continue
                        if run_key is not None:
                            counts[run_key] = counts.get(run_key, 0) + run_n
                            if run_timed:
                                stats.observe_latency(run_key[1], now - run_t0, run_n)
                        run_key = (client, name, "error" if k else "ok")
                        run_t0 = t0
                        run_n = 1
                        run_timed = timed
                        continue
                    if k == KIND_ERROR:
                        errors = True
                    if run_key is not None:
                        counts[run_key] = counts.get(run_key, 0) + run_n
                        if run_timed:
                            stats.observe_latency(run_key[1], now - run_t0, run_n)
                        run_key = None
                    self._on_frame(fr, now)
                    if self.monitor:
                        break
                if run_key is not None:
                    counts[run_key] = counts.get(run_key, 0) + run_n
                    if run_timed:
                        stats.observe_latency(run_key[1], now - run_t0, run_n)
            if pending and type(pending[0]) is Pending and pending[0].expect == 0:
                self._drain_head(None, now)
        else:
            out: list[bytes] = []
            start = 0
            for fr in frames:
                head = self.pending[0] if self.pending else None
                internal = type(head) is Pending and head.kind == INTERNAL and fr[1] != KIND_PUSH
                seg = data[start : fr[0]]
                start = fr[0]
                if internal:
                    self._internal_seg(head, seg, out)
                else:
                    if fr[1] == KIND_ERROR:
                        errors = True
                        if (self.hello_auth_check is not None and type(head) is Pending and head.name == "hello"
                                and credentials_refused(seg)):
                            # the HELLO carried the proxy's credentials (proxy.gate), not the client's:
                            # it is told whose were refused, as on the separate AUTH and with a pool
                            seg = UPSTREAM_REFUSED
                    out.append(seg)
                    if type(head) is Pending and head.capture is not None and fr[1] != KIND_PUSH:
                        self.internal_buf += seg  # a copy of the reply, for the handshake book
                self._on_frame(fr, now)
                # local answers now due go right after the reply they waited for
                self._drain_head(out, now)
                if self.monitor:
                    out.append(data[start:])
                    start = len(data)
                    break
            if self.push_buf and frames:
                out.append(self.push_buf)
                self.push_buf = b""
            if start < len(data):
                head = self.pending[0] if self.pending else None
                if type(head) is Pending and head.kind == INTERNAL:
                    self._internal_seg(head, data[start:], out)
                else:
                    out.append(data[start:])
                    if type(head) is Pending and head.capture is not None:
                        self.internal_buf += data[start:]
            if out:
                self._write_client(b"".join(out))
        if errors or self.quota_errors.tail:
            self.quota_errors.scan(data, frames, was_in_frame, self.framer.in_frame)
        else:
            # an error reply may have begun at the end of this read: remember its start
            tail = frames[-1][0] if frames else (len(data) if was_in_frame else 0)
            if tail < len(data) and data[tail] == 45:  # '-'
                self.quota_errors.scan(data, frames, was_in_frame, self.framer.in_frame)
        if self.push_buf and not self.framer.in_frame:
            buf, self.push_buf = self.push_buf, b""
            self._write_client(buf)
        self._maybe_close()

    def _on_frame(self, fr: Any, now: float) -> None:
        pending = self.pending
        kind = fr[1]
        h = pending[0] if pending else None
        obj = type(h) is Pending
        if obj and h.expect is None:
            self.subs.expect(h, self.in_multi)
        sub = obj and h.sub
        if kind == KIND_PUSH:
            if sub and fr[2] is not None and fr[2].lower() in CONFIRM_KINDS:
                self._confirmation(h, fr, now)
            else:
                self.stats.pushes += 1
            return
        if kind == KIND_ARRAY and self.protocol == 2 and fr[2] is not None:
            head = fr[2].lower()
            if head in MESSAGE_KINDS and self.subs.any():
                self.stats.pushes += 1
                return
            if head in CONFIRM_KINDS:
                if sub:
                    self._confirmation(h, fr, now)
                    return
                if self.subs.any():
                    self.stats.pushes += 1
                    return
        if h is None:
            self.stats.unpaired_replies += 1
            return
        if not obj:
            name, client, t0, timed, c = h
            if c > 1:
                pending[0] = (name, client, t0, timed, c - 1)
            else:
                pending.popleft()
            self.queued -= 1
            self.stats.count_command(client, name, "error" if kind == KIND_ERROR else "ok")
            if timed:
                self.stats.observe_latency(name, now - t0)
            return
        pending.popleft()
        if h.kind == INTERNAL:
            self.n_special -= 1
            self._complete_internal(h, kind == KIND_ERROR)
        else:
            self._complete(h, kind == KIND_ERROR, now, kind)

    def _drain_head(self, out: list[bytes] | None, now: float) -> None:
        """Pop what is due at the head: local answers (appended to ``out``, or written) and commands
        that expect no reply (CLIENT REPLY OFF/SKIP)."""
        pending = self.pending
        while pending:
            h = pending[0]
            if type(h) is tuple:
                return
            if h.kind == LOCAL:
                pending.popleft()
                self.n_special -= 1
                if out is None:
                    self._write_client(h.reply)  # type: ignore[arg-type]
                else:
                    out.append(h.reply)  # type: ignore[arg-type]
            elif h.expect == 0 and h.kind == UPSTREAM:
                pending.popleft()
                self._complete(h, False, now)
            else:
                return

    def _confirmation(self, h: Pending, fr: Any, now: float) -> None:
        if self.subs.confirmed(h, fr[2].lower(), fr[3]):
            self.pending.popleft()
            self._complete(h, False, now)

    def _complete(self, e: Pending, error: bool, now: float, kind: int = 0) -> None:
        if e.capture is not None:
            self.n_special -= 1
            data, self.internal_buf = bytes(self.internal_buf), bytearray()
            if e.on_reply is not None:
                e.on_reply(error, data)
            elif self.book is not None:
                args = e.capture
                proto = int(args[1]) if e.name == "hello" and len(args) > 1 and args[1] in (b"2", b"3") else self.protocol
                self.book.record(e.name, args, data, error, proto)
        stats = self.stats
        name = e.name
        stats.count_command(e.client, name, "error" if error else "ok")
        if e.timed:
            stats.observe_latency(name, now - e.t0)
        if e.deferred:
            if error or not self.in_multi:
                stats.count_upstream(e.client, name)  # rejected while queueing, or not in MULTI
            else:
                self.tx_queued.append((e.client, name))
        if e.args is not None:
            self._special_reply(e, error, kind)

    def _special_reply(self, e: Pending, error: bool, kind: int) -> None:
        name = e.name
        args = e.args or []
        if name == "multi":
            if not error:
                self.in_multi = True
        elif name == "exec":
            if self.in_multi and kind == KIND_ARRAY:
                for client, cmd in self.tx_queued:
                    self.stats.count_upstream(client, cmd)
                if self.tx_name is not None:
                    self.name = self.tx_name or None
                    self.client = self._compute_label()
            self.tx_queued.clear()
            self.tx_name = None
            self.in_multi = False
        elif name == "discard":
            self.tx_queued.clear()
            self.tx_name = None
            self.in_multi = False
        if error and name in ("client|setname", "hello") and e.reply is not None:
            self.name = e.reply or None  # refused: the name it had before
            self.client = self._compute_label()
        if name == "hello" and self.hello_auth_check is not None:
            check, self.hello_auth_check = self.hello_auth_check, None
            check(error, b"-WRONGPASS or NOAUTH in reply to HELLO AUTH\r\n" if error else b"")
        if name == "reset" and not error:  # runs at once, inside MULTI too
            self.protocol = 2
            self.name = None
            self.client = self._compute_label()
            self.subs.reset()
            self.tx_queued.clear()
            self.tx_name = None
            self.in_multi = False
            self.monitor = False
            return
        if error or self.in_multi or name in ("multi", "exec", "discard"):
            return
        if name == "hello":
            if len(args) >= 2:
                try:
                    self.protocol = int(args[1])
                except ValueError:
                    pass
        elif name == "monitor":
            self.monitor = True
        elif name == "quit":
            self.closing = True

    def _internal_seg(self, head: Pending, seg: bytes, out: list[bytes]) -> None:
        """Bytes of the proxy's own command's reply: kept for its callback; or, for a reply its
        ``relay`` hook claims as it starts (an array: proxy.pollhold's item for a waiting client),
        passed to the client as they come; or, once its ``divert`` hook has seen enough of it (a
        large item nobody waits for), sent back upstream as they come, after the bytes the hook
        gives (the start of the command that puts it back). Never held whole in those cases."""
        if head.relaying == RELAY_CLIENT:
            out.append(seg)
            return
        if head.relaying == RELAY_UPSTREAM:
            self._write_upstream(seg)
            return
        if head.relay is not None and not self.internal_buf and seg[:2] == b"*2":
            relay, head.relay = head.relay, None
            if relay():
                head.relaying = RELAY_CLIENT
                out.append(seg)
                return
        self.internal_buf += seg
        if head.divert is not None:
            verdict = head.divert(self.internal_buf)
            if verdict is False:
                head.divert = None
            elif verdict is not None:
                n, prefix = verdict
                head.divert = None
                head.relaying = RELAY_UPSTREAM
                rest, self.internal_buf = bytes(self.internal_buf[n:]), bytearray()
                self._write_upstream(prefix + rest)

    def expect_internal(
        self, name: str, on_reply: Callable[[bool, bytes], None] | None, client: str = PROXY_CLIENT
    ) -> Pending:
        """An INTERNAL entry for a command whose bytes the caller writes upstream itself, in order
        (a ``divert`` hook's command); counted like push_internal's."""
        e = Pending(name, client, INTERNAL, self.clock(), None)
        e.on_reply = on_reply
        self.pending.append(e)
        self.n_special += 1
        self.up_n += 1
        self.stats.count_upstream(client, name)
        return e

    def _complete_internal(self, e: Pending, error: bool) -> None:
        data, self.internal_buf = bytes(self.internal_buf), bytearray()
        if e.args is not None:
            self._special_reply(e, error, KIND_ERROR if error else 0)
        if e.on_reply is not None:
            e.on_reply(error, data)

    def upstream_lost(self, reason: str) -> None:
        """The upstream connection ended or broke: the client connection is closed (after what was
        already received has been passed on)."""
        self.connected = False
        self._abandon()
        self._ended()
        self.closing = True
        if self._close_upstream is not None:
            self._close_upstream()
        self._close_client()
        self.closed = True

    # -- helpers -----------------------------------------------------------------------------
    def _write_upstream(self, data: bytes) -> None:
        if data and self._send_upstream is not None:
            self.stats.bytes["to_upstream"] += len(data)
            self._send_upstream(data)

    def _write_client(self, data: bytes) -> None:
        if data and not self.closed and not self.lingering:
            self.stats.bytes["to_client"] += len(data)
            self._send_client(data)

    def _maybe_close(self) -> None:
        if self.closing and not self.pending and not self.waiting and not self.closed and not self.held:
            self._ended()
            self.closed = True
            if self._close_upstream is not None:
                self._close_upstream()
            self._close_client()

    def stalled(self, now: float, timeout: float) -> bool:
        """The upstream has said nothing for ``timeout`` seconds while a reply is due: a command
        that does not block waits longer than that for its reply (or the rest of it), or a blocking
        one longer than its own timeout plus that margin."""
        if not self.connected or not self.pending:
            return False
        if self.end.relayed_at is not None:
            # the client's end was passed on, and the server has not closed in turn (one that does
            # not take a half-close, or a proxy in between): it is not waited for longer
            return now - self.end.relayed_at > timeout
        h = self.pending[0]
        if type(h) is tuple:
            since = h[2]
        else:
            if h.kind == LOCAL or h.expect == 0:
                return False
            if not h.timed:
                if h.deadline is None:  # blocks for ever, or a subscription: it may wait
                    return False
                return now - max(h.deadline, self.last_reply_at) > timeout
            since = h.t0
        return now - max(since, self.last_reply_at) > timeout

    def upstream_timeout(self, timeout: float) -> None:
        """The upstream stalled (see :meth:`stalled`): every command waiting gets an error, and the
        connection closes (a late reply could no longer be paired)."""
        self.refuse(encode_error(f"ERR upstream timeout: no reply in {timeout:g}s"))

    @property
    def idle(self) -> bool:
        """Nothing in flight: safe to close during a graceful shutdown."""
        return not self.pending and not self.waiting and not self.parser.pending
