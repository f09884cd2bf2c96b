"""What an upstream's error replies mean: a hosted Redis's "request quota used up" errors, spotted
in the replies of one upstream connection (including an error reply split across reads), and
whether an error to the proxy's own handshake refuses its credentials or the connection itself.
No I/O: the session hands it each read (only when the read holds an error reply, or may begin one)."""

from __future__ import annotations

from typing import Any

from .resp import KIND_ERROR, encode_error

KEEP = 200  # bytes of an error reply kept across reads: enough for the messages looked for


# what a client gets when the upstream refuses the proxy's credentials (it fails closed)
UPSTREAM_REFUSED = encode_error("ERR upstream rejected the proxy's credentials")


def credentials_refused(reply: bytes) -> bool:
    """An error reply to the proxy's own AUTH, HELLO ... AUTH or SELECT that refuses its
    credentials (a wrong password, a user without the permission). Anything else is the server
    refusing the connection for its own reason (Redis's 'max number of clients reached', Upstash's
    'max concurrent connections exceeded', a db index out of range): a client is told that, in
    the server's words, as it would be without the proxy."""
    head = reply[:80].upper()
    if head.startswith((b"-WRONGPASS", b"-NOAUTH", b"-NOPERM")):
        return True
    return head.startswith(b"-ERR") and (b"PASSWORD" in head or b"AUTH" in head)


def unsupported(reply: bytes) -> bool:
    """An error to HELLO that says the server does not speak it (an old server, or no RESP3)."""
    head = reply[:80].upper()
    return head.startswith(b"-NOPROTO") or (head.startswith(b"-ERR") and b"UNKNOWN COMMAND" in head)


class QuotaErrors:
    __slots__ = ("stats", "tail")

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.tail = b""  # start of an error reply split across reads

    def scan(self, data: bytes, frames: list, was_in_frame: bool, in_frame: bool) -> None:
        """Look at the error replies of this read (``frames``: the framer's (end, kind, ...) of each
        reply it completed), including one that began in an earlier read."""
        prev = 0
        for i, fr in enumerate(frames):
            if fr[1] == KIND_ERROR:
                if i == 0 and was_in_frame:
                    if self.tail:
                        joined = self.tail + data[: fr[0]]
                        self._error(joined, 0, len(joined))
                else:
                    self._error(data, prev, fr[0])
            prev = fr[0]
        if not in_frame:
            self.tail = b""
        elif frames or not was_in_frame:  # a new frame starts at ``prev`` in this read
            self.tail = data[prev : prev + KEEP] if data[prev : prev + 1] == b"-" else b""
        elif self.tail:
            self.tail = (self.tail + data)[:KEEP]

    def _error(self, data: bytes, start: int, end: int) -> None:
        """One error reply: a hosted Redis saying its request quota is used up is counted (Upstash:
        'ERR max requests limit exceeded', 'ERR max daily request limit exceeded')."""
        if data.startswith(b"-ERR max ", start) and (
            data.startswith(b"requests limit exceeded", start + 9)
            or data.startswith(b"daily request limit exceeded", start + 9)
        ):
            self.stats.upstream_quota_exceeded += 1
            if self.stats.on_quota is not None:
                self.stats.on_quota(data[start + 1 : end - 2].decode("utf-8", "replace"))
