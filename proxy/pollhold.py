"""The ``poll`` saver: one long blocking pop upstream instead of a client's stream of short ones.

A Celery worker sends ``BRPOP q1 q2 q3 q4 1`` back to back, all day: 86,400 billed commands to
learn, mostly, that nothing arrived. Here the first such pop starts a *hold* on the client's own
upstream connection: the same pop with a long timeout (``hold``, 300 s). The client's pops are
*parked*: answered by the proxy, with nil when the client's own timeout runs out (measured from
when the proxy read it), or with the item the hold brings, at once.

Rules (each has a test):

* the client gets what the server would have given it: the item if one arrives within its
  timeout, nil at its timeout; a command sent after a parked pop waits for it, as on Redis;
* the hold is cancelled (``CLIENT UNBLOCK <id> TIMEOUT``, sent on the proxy's control connection,
  proxy.control) when the client sends anything else, or a pop on other keys; what the client
  sent waits for the hold's reply, so an item it brought goes back first, in order;
* an item the hold brings while no pop of the client's is parked is kept for its next pop for at
  most ``keep`` (1 s), then pushed back to the end it came from (RPUSH for BRPOP, LPUSH for BLPOP);
  so is one that arrives after the client went (its upstream connection stays open until then);
* on a graceful shutdown every hold is cancelled and what it brought is pushed back.

The one window where an item can be lost is a ``kill -9`` of the proxy while it holds an item
popped upstream and not yet written to a client: at most ``keep`` seconds.

Budget: a hold is charged (caps) for itself plus the two commands it may need (the UNBLOCK, the
push back); what it did not use is given back when it ends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import hiredis

from .entries import RELAY_CLIENT, RELAY_UPSTREAM, Admission

log = logging.getLogger("respmeter.savers")

WAIT = (Admission.WAIT, None, "")
PARK = (Admission.PARK, None, "")
NIL = {2: b"*-1\r\n", 3: b"_\r\n"}
PUSH_BACK = {"brpop": b"RPUSH", "blpop": b"LPUSH"}
_TIMEOUT = re.compile(rb"^[0-9]{1,9}(\.[0-9]{1,9})?$")
SPARE = 2  # commands a hold may still need: CLIENT UNBLOCK, the push back
# an item this large that no pop is waiting for goes back upstream as it arrives, never held whole
DIVERT_MIN = 256 * 1024


class Parked:
    __slots__ = ("name", "keys", "timer")

    def __init__(self, name: str, keys: tuple[bytes, ...]) -> None:
        self.name = name
        self.keys = keys
        self.timer: Any = None


class Hold:
    __slots__ = ("name", "keys", "client", "cancelling", "entry")

    def __init__(self, name: str, keys: tuple[bytes, ...], client: str) -> None:
        self.name = name
        self.keys = keys
        self.client = client
        self.cancelling = False
        self.entry: Any = None  # its Pending entry on the session


class Kept:
    """An item a hold brought that no pop of the client's was waiting for."""

    __slots__ = ("name", "key", "value", "raw", "timer", "at")

    def __init__(self, name: str, key: bytes, value: bytes, raw: bytes, at: float) -> None:
        self.at = at  # when it arrived from the upstream
        self.name = name
        self.key = key
        self.value = value
        self.raw = raw
        self.timer: Any = None


class PollState:
    __slots__ = ("hold", "parked", "kept", "conn_id", "spare", "spare_client", "pushing", "gone", "db")

    def __init__(self) -> None:
        self.hold: Hold | None = None
        self.parked: Parked | None = None
        self.kept: Kept | None = None
        self.conn_id: bytes | None = None  # the upstream connection's CLIENT ID
        self.spare = 0  # budget taken for commands the hold may still need
        self.spare_client = ""
        self.pushing = 0  # push backs sent, not answered yet
        self.gone = False  # the client went (the session lingers)
        self.db: bytes | None = None  # the database the client SELECTed last (None: the upstream URL's)


def parse_pop(args: list[bytes]) -> tuple[tuple[bytes, ...], float] | None:
    """(keys, timeout) of ``BRPOP key [key ...] timeout``, or None when the server should judge
    it (it is then forwarded as it is)."""
    if len(args) < 3 or not _TIMEOUT.match(args[-1]):
        return None
    return tuple(args[1:-1]), float(args[-1])


class PollSaver:
    def __init__(
        self,
        config: Any,
        stats: Any,
        *,
        call_later: Callable[[float, Callable[[], None]], Any] | None,
        control: Any,
        budget: Any = None,
    ) -> None:
        self.hold_seconds = config.hold
        self.hold_arg = ("%g" % config.hold).encode()  # (Redis takes a decimal timeout)
        self.keep = config.keep
        self.stats = stats
        self.call_later = call_later
        self.control = control  # proxy.control.ControlLink: where CLIENT UNBLOCK goes
        self.budget = budget  # proxy.limits.Limits (take / refund), or None without caps
        self.sessions: set[Any] = set()  # sessions with a hold, a parked pop or a kept item
        self.stopping = False
        self.disabled = control is None or call_later is None
        self.control_ok = False  # the control connection has shown it may CLIENT UNBLOCK
        self.probing = False
        self.probe_after = 0.0

    # -- session protocol ----------------------------------------------------------------------------
    def init_session(self, session: Any) -> None:
        session.poll = PollState()
        session.on_client_gone = self._client_gone
        session.on_close.append(lambda: self._closed(session))

    def busy(self, session: Any) -> bool:
        st = session.poll
        return st.hold is not None or st.parked is not None or st.kept is not None or st.pushing > 0

    def admit(self, s: Any, args: list[bytes], name: str) -> tuple[int, Any, str] | None:
        st: PollState = s.poll
        if st.parked is not None or st.pushing:
            return WAIT  # a parked pop blocks the connection, as on Redis
        if name == "select" and len(args) == 2:
            st.db = args[1]
        hold = st.hold
        if hold is not None and hold.cancelling:
            return WAIT
        pop = name in PUSH_BACK
        parsed = parse_pop(args) if pop and self._eligible(s) else None
        if st.kept is not None:
            k = st.kept
            if parsed is not None and name == k.name and k.key in parsed[0]:
                st.kept = None
                self._cancel_timer(k.timer)
                self._done_with_item(s, k)
                self._finish(s)
                return Admission.REPLY, k.raw, "ok"
            self._push_back_soon(s)
            return WAIT
        if hold is not None:
            if parsed is not None and hold.name == name and hold.keys == parsed[0]:
                self._park(s, name, parsed)
                return PARK
            self._cancel(s)
            return WAIT
        if parsed is None or self.disabled or self.stopping:
            return None
        if not self.control_ok:
            self._probe()
            return None  # (this pop goes upstream as it is; holds start once UNBLOCK is known to work)
        if not self._start(s, name, parsed[0]):
            return None  # no budget for a hold: the caps decide about the pop itself
        self._park(s, name, parsed)
        return PARK

    @staticmethod
    def _eligible(s: Any) -> bool:
        """Nothing the client sees is pending, and the connection is in its plain state."""
        if s.multi_view or s.reply_off or s.reply_skip or s.monitor or not s.connected:
            return False
        if s.subs.any() or not s.up_ready:
            return False
        return not s.pending or (len(s.pending) == 1 and s.poll.hold is not None and s.pending[0] is s.poll.hold.entry)

    # -- parking --------------------------------------------------------------------------------------
    def _park(self, s: Any, name: str, parsed: tuple[tuple[bytes, ...], float]) -> None:
        keys, timeout = parsed
        p = Parked(name, keys)
        s.poll.parked = p
        s.parked = True
        self.sessions.add(s)
        if timeout > 0:
            p.timer = self.call_later(timeout, lambda: self._timed_out(s, p))  # type: ignore[misc]

    def _timed_out(self, s: Any, p: Parked) -> None:
        st = s.poll
        if st.parked is not p or s.closed:
            return
        self._unpark(s)
        self.stats.count_saved(s.client, p.name, "poll")
        s.late_reply(NIL[3 if s.protocol == 3 else 2])

    def _unpark(self, s: Any) -> None:
        p = s.poll.parked
        if p is not None:
            self._cancel_timer(p.timer)
        s.poll.parked = None
        s.parked = False

    # -- the hold --------------------------------------------------------------------------------------
    def _start(self, s: Any, name: str, keys: tuple[bytes, ...]) -> bool:
        st: PollState = s.poll
        client = s.client
        need_id = st.conn_id is None
        n = 1 + SPARE + need_id
        if self.budget is not None and not self.budget.take(client, n):
            return False
        st.spare += SPARE
        st.spare_client = client
        if need_id:
            s.send_internal([b"CLIENT", b"ID"], lambda error, data: self._got_id(s, error, data))
        h = Hold(name, keys, client)
        st.hold = h
        h.entry = s.send_internal(
            [name.upper().encode(), *keys, self.hold_arg],
            lambda error, data: self._hold_reply(s, h, error, data),
            client,
        )
        self._watch(s, h)
        self.sessions.add(s)
        return True

    def _watch(self, s: Any, h: Hold) -> None:
        e = h.entry
        e.timed = False  # (the stall check judges it by its own timeout)
        e.deadline = s.clock() + self.hold_seconds
        e.relay = lambda: self._relay(s, h)
        e.divert = lambda buf: self._divert(s, h, buf)

    def _relay(self, s: Any, h: Hold) -> bool:
        """The hold's reply is an item and starts arriving: if the client's pop is parked on the same
        keys, the item goes to it as it comes (a large value is never held whole in the proxy)."""
        st = s.poll
        p = st.parked
        if p is None or st.gone or h.cancelling or self.stopping or p.name != h.name or p.keys != h.keys:
            return False
        self._cancel_timer(p.timer)  # (committed: its own timeout no longer answers it)
        p.timer = None
        return True

    def _divert(self, s: Any, h: Hold, buf: bytearray) -> Any:
        """The start of the hold's reply, with no pop of the client's waiting for it: a large item
        (DIVERT_MIN) goes back to its list as it arrives, ``(header length, start of the push
        back)``; None: not enough seen yet; False: keep it (small, or not an item)."""
        if not buf.startswith(b"*2\r\n$"):
            return False if len(buf) >= 5 else None
        i = buf.find(b"\r\n", 5)
        if i < 0:
            return None if len(buf) < 32 else False
        klen = int(buf[5:i])
        kend = i + 2 + klen
        if len(buf) < kend + 3:
            return None if klen < 65536 else False
        j = buf.find(b"\r\n", kend + 3)
        if buf[kend : kend + 3] != b"\r\n$" or (j < 0 and len(buf) > kend + 32):
            return False
        if j < 0:
            return None
        vlen = int(buf[kend + 3 : j])
        if vlen < DIVERT_MIN:
            return False
        key = bytes(buf[i + 2 : kend])
        st = s.poll
        if st.spare > 0:
            st.spare -= 1  # (taken with the hold)
        elif self.budget is not None:
            self.budget.take(st.spare_client or s.client, 1)  # (never refused: an item must not be lost)
        st.pushing += 1
        k = Kept(h.name, key, b"", b"", s.clock())
        cmd = PUSH_BACK[h.name]
        s.expect_internal(cmd.decode().lower(), lambda error, data: self._pushed(s, k, error, data))
        return j + 2, b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n" % (len(cmd), cmd, klen, key, vlen)

    def _probe(self) -> None:
        """Before the first hold: can the control connection let a hold go? ``CLIENT UNBLOCK 0``
        (no such client: ``:0``) proves its credentials and the ACL, once per proxy process."""
        if self.probing or self.control is None or time.monotonic() < self.probe_after:
            return
        self.probing = True
        self.control.send([b"CLIENT", b"UNBLOCK", b"0", b"TIMEOUT"], self._probed)

    def _probed(self, error: bool, data: bytes) -> None:
        self.probing = False
        if not error:
            self.control_ok = True
            return
        text = data[:200].decode("utf-8", "replace").strip()
        if "control connection" in text:
            self.probe_after = time.monotonic() + 10  # (the upstream is unreachable now: ask again later)
            return
        log.error("poll saver off: the proxy's own upstream connection may not CLIENT UNBLOCK (%s); it "
                  "needs the upstream credentials (URL or --upstream-password-file) and that command", text)
        self.disabled = True

    def _got_id(self, s: Any, error: bool, data: bytes) -> None:
        st = s.poll
        if not error and data[:1] == b":":
            st.conn_id = data[1:].strip()
        else:
            log.warning("poll saver: CLIENT ID refused (%s): holds cannot be cancelled, poll saver off",
                        data[:120].decode("utf-8", "replace").strip())
            self.disabled = True
        if st.hold is not None and st.hold.cancelling:
            self._unblock(s)

    def _cancel(self, s: Any) -> None:
        h = s.poll.hold
        if h is None or h.cancelling:
            return
        h.cancelling = True
        if s.poll.conn_id is not None or self.disabled:
            self._unblock(s)
        # else: sent when CLIENT ID answers (_got_id)

    def _unblock(self, s: Any) -> None:
        st = s.poll
        if st.spare > 0:
            st.spare -= 1  # (taken with the hold)
        if st.conn_id is None or self.control is None:
            self._cannot_cancel(s, "no connection id")
            return
        self.control.send(
            [b"CLIENT", b"UNBLOCK", st.conn_id, b"TIMEOUT"],
            lambda error, data: self._unblocked(s, error, data),
        )

    def _unblocked(self, s: Any, error: bool, data: bytes) -> None:
        if error:
            self._cannot_cancel(s, data[:200].decode("utf-8", "replace").strip())
        # :1 the hold was let go, :0 its reply was on its way already: either way it comes now

    def _cannot_cancel(self, s: Any, why: str) -> None:
        """The hold cannot be let go: the connection is closed (as when the upstream drops it) rather
        than leave the client waiting for up to ``hold`` seconds. The saver turns itself off."""
        log.error("poll saver: could not cancel a held %s (%s); closing the client, poll saver off",
                  s.poll.hold.name.upper() if s.poll.hold else "pop", why)
        self.disabled = True
        if not s.closed:
            s.upstream_lost("poll saver: hold could not be cancelled")

    def _hold_reply(self, s: Any, h: Hold, error: bool, data: bytes) -> None:
        st: PollState = s.poll
        if st.hold is h:
            st.hold = None
        if s.closed:
            return
        if h.entry.relaying == RELAY_UPSTREAM:  # a large item went back to its list as it arrived
            p = st.parked
            if p is not None and not st.gone and not self.stopping and p.name == h.name and p.keys == h.keys:
                self._restart(s, h)  # (the client parked meanwhile: a new hold takes it again)
            else:
                self._finish(s)
            s.resume()
            return
        if h.entry.relaying == RELAY_CLIENT:  # the item went to the parked pop as it arrived
            self._unpark(s)
            self.stats.count_command(s.client, h.name, "error" if error else "ok")
            self._finish(s)
            s.resume()
            return
        if error:
            if st.parked is not None and not h.cancelling:
                # the client's pop would have got this error from the server
                self._unpark(s)
                self.stats.count_command(s.client, h.name, "error")
                s.late_reply(data)
            self._finish(s)
            s.resume()
            return
        reader = hiredis.Reader()
        reader.feed(data)
        value = reader.gets()
        if not value:  # nil: the hold timed out, or was let go
            if not h.cancelling and not st.gone and st.parked is not None and not self.stopping:
                p = st.parked
                if p.name == h.name and p.keys == h.keys:
                    self._restart(s, h)
                    return
            self._finish(s)
            s.resume()
            return
        key, item = value[0], value[1]
        p = st.parked
        if p is not None and not st.gone and p.name == h.name and key in p.keys:
            self._unpark(s)
            self.stats.count_command(s.client, h.name, "ok")
            self._finish(s)
            s.late_reply(data)
            return
        k = Kept(h.name, key, item, data, s.clock())
        if h.cancelling or st.gone or self.stopping or self.call_later is None:
            self._push_back(s, k)
            s.resume()
            return
        st.kept = k
        k.timer = self.call_later(self.keep, lambda: self._keep_expired(s, k))

    def _restart(self, s: Any, h: Hold) -> None:
        """The hold ran its whole timeout with the client still polling: hold again."""
        st = s.poll
        if self.budget is not None and not self.budget.take(h.client, 1):
            self._finish(s)  # no budget: the parked pop gets nil at its own timeout
            return
        h2 = Hold(h.name, h.keys, h.client)
        st.hold = h2
        h2.entry = s.send_internal(
            [h.name.upper().encode(), *h.keys, self.hold_arg],
            lambda error, data: self._hold_reply(s, h2, error, data),
            h.client,
        )
        self._watch(s, h2)

    def _keep_expired(self, s: Any, k: Kept) -> None:
        if s.poll.kept is k and not s.closed:
            s.poll.kept = None
            self._push_back(s, k)
            s.resume()

    def _push_back_soon(self, s: Any) -> None:
        """A command other than a matching pop came while an item is kept: it goes back first (not
        from inside the dispatch that is looking at that command)."""
        k = s.poll.kept
        if k is None or k.timer is None:
            return
        self._cancel_timer(k.timer)
        k.timer = self.call_later(0, lambda: self._keep_expired(s, k))  # type: ignore[misc]

    def _push_back(self, s: Any, k: Kept) -> None:
        st = s.poll
        self._done_with_item(s, k)
        if st.spare > 0:
            st.spare -= 1  # (taken with the hold)
        elif self.budget is not None:
            self.budget.take(st.spare_client or s.client, 1)  # (never refused: an item must not be lost)
        st.pushing += 1
        cmd = [PUSH_BACK[k.name], k.key, k.value]
        s.send_internal(cmd, lambda error, data: self._pushed(s, k, error, data))

    def _pushed(self, s: Any, k: Kept, error: bool, data: bytes) -> None:
        st = s.poll
        st.pushing -= 1
        if error:
            log.error("poll saver: could not push an item back to %r: %s", k.key[:100],
                      data[:200].decode("utf-8", "replace").strip())
        self._finish(s)
        if not s.closed:
            s.resume()

    def _done_with_item(self, s: Any, k: Kept) -> None:
        """The item leaves the proxy (to the client, or back upstream): how long it was only here is
        the window a kill -9 could lose it in (respmeter_saver_item_held_seconds_max)."""
        held = s.clock() - k.at
        if held > self.stats.saver_item_held_max:
            self.stats.saver_item_held_max = held

    def _finish(self, s: Any) -> None:
        """Give back the budget the hold did not use, once nothing is left in flight."""
        st = s.poll
        if st.hold is None and st.kept is None and st.pushing == 0:
            if st.spare and self.budget is not None:
                self.budget.refund(st.spare_client, st.spare)
            st.spare = 0
            if st.parked is None:
                self.sessions.discard(s)

    # -- the end ----------------------------------------------------------------------------------------
    def _client_gone(self, s: Any) -> bool:
        """The client went: True keeps its upstream connection until what the hold brings is back."""
        st = s.poll
        self._unpark(s)
        st.gone = True
        self._give_back(s)
        if st.hold is not None:
            if self.call_later is not None:
                # (a hold that never answers: the upstream timeout would close it, but the session is
                # no longer watched by the proxy's stall check)
                self.call_later(self.hold_seconds + 30, lambda: self._linger_expired(s))
        return st.hold is not None or st.pushing > 0

    def _linger_expired(self, s: Any) -> None:
        if not s.closed:
            s.upstream_lost("poll saver: held pop never answered")

    def _closed(self, s: Any) -> None:
        st = s.poll
        self._unpark(s)
        if st.kept is not None:
            # the upstream connection broke with an item kept: it goes back on the control connection
            k, st.kept = st.kept, None
            self._cancel_timer(k.timer)
            self._done_with_item(s, k)
            if self.control is not None:
                cmds = [[PUSH_BACK[k.name], k.key, k.value]]
                if st.db is not None:  # (in the client's database, then back to the control's own)
                    cmds = [[b"SELECT", st.db], *cmds, [b"SELECT", b"%d" % self.control.db]]
                for cmd in cmds:
                    self.control.send(cmd, lambda error, data: self._rescued(k, error, data))
            else:
                log.error("poll saver: connection closed holding an item of %r (lost)", k.key[:100])
        if st.spare and self.budget is not None:
            self.budget.refund(st.spare_client, st.spare)
            st.spare = 0
        st.hold = None
        self.sessions.discard(s)

    @staticmethod
    def _rescued(k: Kept, error: bool, data: bytes) -> None:
        if error:
            log.error("poll saver: could not push an item back to %r: %s", k.key[:100],
                      data[:200].decode("utf-8", "replace").strip())

    def shutdown(self) -> None:
        self.stopping = True
        for s in list(self.sessions):
            if not s.closed:
                self._give_back(s)

    def _give_back(self, s: Any) -> None:
        """What the proxy holds for this client goes back: a kept item now, a hold's at its answer."""
        st = s.poll
        if st.kept is not None:
            k, st.kept = st.kept, None
            self._cancel_timer(k.timer)
            self._push_back(s, k)
        if st.hold is not None:
            self._cancel(s)

    @staticmethod
    def _cancel_timer(timer: Any) -> None:
        if timer is not None:
            timer.cancel()

