"""One client connection's pub/sub state, exactly as the server's confirmations establish it.

The counts decide how replies are framed and paired (a RESP2 connection with a subscription gets
messages as arrays, proxy.session); the names, kept when a saver asks for them (proxy.events), say
which channels and patterns the connection listens to. No I/O here: the session feeds it the
subscription commands as their confirmations arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_TRACKED = 1024  # names kept per connection; past it the connection counts as unknown


class Subscriptions:
    __slots__ = ("channels", "patterns", "shard_channels", "names", "unknown", "on_change", "owner")

    def __init__(self, owner: Any) -> None:
        self.owner = owner  # the session (what on_change is told about)
        self.channels = 0
        self.patterns = 0
        self.shard_channels = 0
        # by group (b"channel", b"pattern", b"shard"): the names, when kept (None: not kept)
        self.names: dict[bytes, set[bytes]] | None = None
        self.unknown = False  # subscribed inside MULTI, or past MAX_TRACKED: names not exact
        self.on_change: Callable[[Any], None] | None = None

    def any(self) -> bool:
        return bool(self.channels or self.patterns or self.shard_channels)

    def expect(self, h: Any, in_multi: bool) -> None:
        """Decide a subscription command's reply shape now that the server state is known (it is at
        the head of the pending replies): how many confirmations (``h.expect``), and whether they
        are confirmations at all (``h.sub``; inside MULTI the reply is EXEC's)."""
        if in_multi:
            h.expect = 1
            return
        args = h.args or []
        n = len(args) - 1
        name = h.name
        if n > 0:
            h.expect = n
        elif name == "unsubscribe":
            h.expect = max(1, self.channels)
        elif name == "punsubscribe":
            h.expect = max(1, self.patterns)
        elif name == "sunsubscribe":
            h.expect = max(1, self.shard_channels)
        else:
            h.expect = 1  # a subscribe without channels: an arity error
        h.sub = n > 0 or name.endswith("unsubscribe")

    def confirmed(self, h: Any, kind: bytes, num: int | None) -> bool:
        """One confirmation of ``h`` (its ``kind`` and the server's count): True when it was the
        last one ``h`` expects."""
        if self.names is not None:
            self._track(h, kind)
        if num is not None:
            if kind in (b"subscribe", b"unsubscribe"):
                self.channels = max(0, num - self.patterns)
            elif kind in (b"psubscribe", b"punsubscribe"):
                self.patterns = max(0, num - self.channels)
            else:
                self.shard_channels = max(0, num)
        h.expect = (h.expect or 1) - 1
        return h.expect <= 0

    def _track(self, h: Any, kind: bytes) -> None:
        """The n-th confirmation of a (P|S)(UN)SUBSCRIBE is for its n-th argument; one without
        arguments drops them all."""
        args = (h.args or [])[1:]
        group = b"pattern" if kind[0:1] == b"p" else b"shard" if kind in (b"ssubscribe", b"sunsubscribe") else b"channel"
        names = self.names
        assert names is not None
        held = names.setdefault(group, set())
        if not args:
            held.clear()
        else:
            i = len(args) - (h.expect or 1)
            if 0 <= i < len(args):
                if kind.endswith(b"unsubscribe"):
                    held.discard(args[i])
                elif sum(map(len, names.values())) < MAX_TRACKED:
                    held.add(args[i])
                else:
                    self.unknown = True
        self._changed()

    def queued_in_multi(self) -> None:
        """A subscription command was queued in MULTI: its confirmations come inside EXEC's reply,
        which is not tracked, so the names are no longer exact."""
        self.unknown = True
        self._changed()

    def reset(self) -> None:
        """RESET: no subscriptions left."""
        self.channels = self.patterns = self.shard_channels = 0
        if self.names is not None:
            self.names.clear()
            self.unknown = False
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.owner)
