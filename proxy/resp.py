"""RESP framing with no I/O in it.

Two incremental framers, both fed with bytes as they arrive and never touching a socket:

* :class:`RequestParser` frames client requests: RESP arrays of bulk strings and inline commands
  (``PING\\r\\n`` as telnet sends). It applies Redis's own limits and is at least as strict as Redis's
  parser, so every byte range it accepts is framed the same way by the server (no request smuggling:
  what the proxy counts and authorises is exactly what the server executes).
* :class:`ReplyFramer` frames server replies of RESP2 and RESP3 without buffering payloads: it reports
  where each top-level reply ends inside the chunk just fed, whether it is an error or a push frame, and a
  little of its head (the kind of a pub/sub message, a subscription count) so the session can pair replies
  with requests. Attributes (``|``) are treated as a prefix of the reply they annotate.

Both keep a bound on what they hold for an incomplete frame.

proxy/_speedups.c is their C twin for the hot path (runs of plain requests, and replies paired a
read at once); this module stays the reference, and the fallback when the extension is not built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any, NamedTuple

try:  # optional accelerator for the common case (see RequestParser._fast)
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    _hiredis = None

# The C twin of this module's hot path (proxy/_speedups.c), built at install time when a compiler is
# there. RESPMETER_PURE_PYTHON=1 turns it off (the tests run both and compare them).
_speedups: Any = None
if os.environ.get("RESPMETER_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _speedups
    except ImportError:
        _speedups = None

__all__ = [
    "ProtocolError",
    "RequestParser",
    "ReplyFramer",
    "PyReplyFramer",
    "Frame",
    "KIND_NORMAL",
    "KIND_ERROR",
    "KIND_PUSH",
    "KIND_ARRAY",
    "encode_command",
    "encode_error",
    "split_inline",
    "expand",
    "hot_path",
]

CRLF = b"\r\n"
DEFAULT_MAX_BULK = 512 * 1024 * 1024  # proto-max-bulk-len
DEFAULT_MAX_QUERY = 1024 * 1024 * 1024  # client-query-buffer-limit
MAX_INLINE = 64 * 1024  # PROTO_INLINE_MAX_SIZE
MAX_MULTIBULK = 2**31 - 1  # INT_MAX, as Redis checks it
UNAUTH_MAX_ARGS = 10  # before AUTH, as Redis: arguments of one request
UNAUTH_MAX_BULK = 16384  # ... and bytes of one argument
# A request is streamed (see RequestParser) once it is known to hold at least this many bytes, or
# this many arguments, and is not complete yet
STREAM_MIN = 256 * 1024
STREAM_ARGS = 4096
HEAD_ARG = 256  # bytes kept of an argument that is still arriving when streaming starts


class ProtocolError(Exception):
    """Input that can never become a valid frame. The message is Redis's wording, without ``ERR``."""


NOKEY = "-"  # the key pattern of a command without a key (proxy.patterns re-exports it)
if _speedups is not None:
    _speedups.init(ProtocolError, NOKEY)
_c_scan = _speedups.scan if _speedups is not None else None


def hot_path() -> str:
    """Which implementation frames requests and replies: "C" or "Python"."""
    return "C" if _speedups is not None else "Python"


def _strict_int(line: bytes, allow_negative: bool) -> int:
    """Parse an integer the way Redis's ``string2ll`` does: plain ASCII digits, no sign but ``-``,
    no spaces, underscores or leading zeros. Python's ``int()`` alone accepts all of those."""
    if line.isdigit():
        if len(line) > 1 and line[0] == 48:  # leading zero
            raise ValueError(line)
        return int(line)
    if allow_negative and line[:1] == b"-" and line[1:].isdigit() and line[1:2] != b"0":
        return int(line)
    raise ValueError(line)


# Inline splitting follows sdssplitargs(): whitespace separated, "double quotes" with C escapes,
# 'single quotes' with only \' escaped, and a closing quote must be followed by space or the end.
_SPACE = frozenset(b" \n\r\t\v\f\0")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command line into arguments, as Redis does; raise ProtocolError on bad quoting."""
    if b'"' not in line and b"'" not in line:
        return line.split()
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            if inq:
                if i >= n:
                    raise ProtocolError("Protocol error: unbalanced quotes in request")
                c = line[i]
                if (
                    c == 92
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif insq:
                if i >= n:
                    raise ProtocolError("Protocol error: unbalanced quotes in request")
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in _SPACE:
                    break
                if c == 34:
                    inq = True
                elif c == 39:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


_NEED = object()
_HUGE_COUNT = re.compile(rb"\*[0-9]{7}")
_pack = _hiredis.pack_command if _hiredis is not None else None


class RequestParser:
    """Incremental framer for client requests.

    ``feed(data)`` returns ``(commands, raw)``: ``commands`` is a list of ``(args, start, end)`` for every
    request completed by this chunk, with ``raw[start:end]`` the exact bytes of that request, and ``raw`` the
    contiguous bytes of all of them (empty commands such as ``*0\\r\\n`` and blank inline lines are consumed
    and skipped, as Redis does). After a framing error, :attr:`error` holds the message; commands framed
    before it are still returned, and nothing more is framed.

    Memory: an incomplete request holds at most ``max_query`` bytes; a bulk is never copied more than
    twice however it is split, and a long multibulk resumes where it stopped instead of starting over.

    Runs: given ``names`` (lower-case command name -> ``(entry, keyed)``) and the C accelerator, a run
    of consecutive commands found in ``names`` comes back as one item ``(entry, pattern, n, start,
    end)`` instead of ``n`` argument lists (see proxy/_speedups.c); ``pattern`` is None unless
    ``fast`` (raw first key -> key pattern) is given, and a command whose pattern ``fast`` does not
    know comes back with its arguments. :func:`expand` turns runs back into commands. :attr:`framed`
    is the number of commands the last feed returned, runs counted in full.
    """

    __slots__ = (
        "max_bulk",
        "max_query",
        "_buf",
        "_chunks",
        "_chunks_len",
        "_need",
        "_consumed",
        "_consumed_len",
        "_args",
        "_remaining",
        "error",
        "_hr",
        "_names",
        "_fastpat",
        "framed",
        "_tail",
        "unauth",
        "stream_ok",
        "streamable",
        "streaming",
        "head",
        "pre",
        "_nostream",
        "_s_left",
        "_s_crlf",
        "_s_bulks",
        "_s_hdr",
    )

    def __init__(
        self,
        max_bulk: int = DEFAULT_MAX_BULK,
        max_query: int = DEFAULT_MAX_QUERY,
        names: dict[bytes, tuple[Any, bool]] | None = None,
        fast: dict[bytes, str] | None = None,
        streamable: frozenset[bytes] = frozenset(),
    ) -> None:
        self.max_bulk = max_bulk
        self.max_query = max_query
        self._buf = b""  # unscanned bytes; scanning always starts at 0
        self._chunks: list[bytes] = []  # arrived, not yet joined onto _buf (waiting for _need)
        self._chunks_len = 0
        self._need = 0  # _buf must be at least this long before scanning again
        self._consumed: list[bytes] = []  # scanned bytes of the current, incomplete request
        self._consumed_len = 0
        self._args: list[bytes] | None = None  # arguments of the current request so far
        self._remaining = 0  # bulks the current request still expects
        self.error: str | None = None
        self._hr = _hiredis.Reader(notEnoughData=_NEED) if _hiredis is not None and _c_scan is None else None
        self._names = names if names is not None else {}
        self._fastpat = fast
        self.framed = 0
        self._tail = False  # _buf holds an incomplete request that C has scanned once already
        # the client has not authenticated yet: Redis's limits for such clients apply (at most 10
        # arguments, bulks of at most 16 KB) and the exact parser frames everything
        self.unauth = False
        # Streaming: a large request of a command in ``streamable`` (lower-case names) is not held
        # whole when ``stream_ok()`` allows it (asked only about large incomplete requests). Once
        # it is known to be large and is still incomplete, ``head`` is set to (its arguments so
        # far, with at most HEAD_ARG bytes of one still arriving; its bytes so far) after the
        # commands of that feed. Its remaining
        # bytes are framed without being kept: each later feed first sets ``pre`` to the bytes
        # that continue it (before that feed's commands); ``streaming`` is False once it ended.
        # The consumer resets ``head`` and ``pre`` to None.
        self.stream_ok: Callable[[], bool] = _never
        self.streamable = streamable
        self.streaming = False
        self.head: tuple[list[bytes], bytes] | None = None
        self.pre: bytes | None = None
        self._nostream = False  # the request in progress is large but cannot be streamed
        self._s_left = 0  # streaming: bytes of the current bulk still to come
        self._s_crlf = 0  # ... then the CRLF bytes after it still to check
        self._s_bulks = 0  # ... bulks of the request not yet complete (the current one included)
        self._s_hdr = b""  # ... the start of a bulk header split across reads

    @property
    def buffered(self) -> int:
        """Bytes held for requests not yet complete."""
        return self._consumed_len + len(self._buf) + self._chunks_len

    @property
    def pending(self) -> bool:
        """True while part of a request is held (or being streamed)."""
        return bool(self._consumed_len or self._buf or self._chunks_len or self.streaming)

    def feed(self, data: bytes) -> tuple[list[Any], bytes]:
        if (
            _c_scan is not None
            and not self._buf
            and self._args is None
            and not self._chunks
            and self.error is None
            and not self.streaming
            and not self.unauth
            and data[:1] == b"*"
        ):
            # the usual read: requests from a boundary, nothing held over
            items, end, need, framed = _c_scan(data, 0, self.max_bulk, self._names, self._fastpat)
            if need == 0 and end == len(data):  # whole requests only
                self._tail = False
                self._need = 0
                self.framed = framed
                return items, data
            self._buf = data
            return self._scan_c(items, end, need, framed)
        if self.error is not None:
            self.framed = 0
            return [], b""
        if self.streaming:
            k = self._skip(data)
            self.pre = data if k == len(data) else data[:k]
            if self.streaming or self.error is not None or k == len(data):
                self.framed = 0
                return [], b""
            data = data[k:]
        if (
            self._hr is not None
            and not self.unauth
            and not self._buf
            and not self._consumed_len
            and not self._chunks
            and data[:1] == b"*"
            and len(data) <= self.max_bulk
            and _HUGE_COUNT.search(data) is None  # hiredis would allocate such arrays up front
        ):
            fast = self._fast(data)
            if fast is not None:
                self.framed = len(fast[0])
                return fast
        big = self._need >= STREAM_MIN and not self._nostream and self.stream_ok()
        if big and self._chunks:  # a large request that may be streamed now: look at it at once
            self._chunks.append(data)
            self._buf += b"".join(self._chunks)
            self._chunks.clear()
            self._chunks_len = 0
        elif not big and (self._chunks or len(self._buf) + len(data) < self._need):
            self._chunks.append(data)
            self._chunks_len += len(data)
            if self._consumed_len + len(self._buf) + self._chunks_len > self.max_query:
                self.error = "Protocol error: query buffer limit exceeded"
                self.framed = 0
                return [], b""
            if len(self._buf) + self._chunks_len < self._need:
                self.framed = 0
                return [], b""
            self._buf += b"".join(self._chunks)
            self._chunks.clear()
            self._chunks_len = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data
        if _c_scan is not None and self._args is None and self._buf[:1] == b"*" and not self.unauth:
            return self._scan_c()
        cmds, raw = self._scan()
        self.framed = len(cmds)
        return cmds, raw

    def _scan_c(self, *scanned: Any) -> tuple[list[Any], bytes]:
        """Frame from a request boundary in C; the Python parser takes over where C stops short.
        ``scanned``: what C already said of ``_buf`` (feed's first look), if it did."""
        buf = self._buf
        items, end, need, framed = scanned or _c_scan(buf, 0, self.max_bulk, self._names, self._fastpat)
        n = len(buf)
        if need >= 0 and end == 0 and n and self._tail:
            # the same incomplete request a second time (a slow client): the Python parser resumes
            # where it stops instead of C scanning it again from its start on every read
            need = -1
        elif need >= STREAM_MIN and end < n and self.stream_ok():
            need = -1  # a large request: the Python parser decides whether to stream it
        if need >= 0:
            self._tail = end < n
            self._buf = buf[end:] if end < n else b""
            self._need = need
            self.framed = framed
            if len(self._buf) > self.max_query:
                self.error = "Protocol error: query buffer limit exceeded"
            return items, (buf[:end] if end < n else buf)
        # something for the exact parser (an inline command, a malformed or very large request)
        self._tail = False
        self._buf = buf[end:]
        self._need = 0
        more, raw = self._scan()
        self.framed = framed + len(more)
        if not end:
            return more, raw
        if more:
            items.extend([(a, s + end, e + end) for a, s, e in more])
            return items, buf[:end] + raw
        return items, buf[:end]

    def _fast(self, data: bytes) -> tuple[list[tuple[list[bytes], int, int]], bytes] | None:
        """Frame a chunk of whole requests in C (hiredis), or return None to use the exact parser.

        hiredis alone is more lenient than Redis (it accepts non-bulk elements, nested arrays and does
        not check the CRLF after a bulk), so its result is only taken when re-encoding the commands
        canonically reproduces the chunk byte for byte: then Redis frames the chunk exactly the same.
        """
        r = self._hr
        cmds = []
        try:
            r.feed(data)
            gets = r.gets
            while (x := gets()) is not _NEED:
                cmds.append(x)
            if r.has_data() or not all(cmds):
                raise ValueError("incomplete, or an empty multibulk")
            packs = list(map(_pack, map(tuple, cmds)))
        except Exception:  # noqa: BLE001 - anything unusual goes to the exact parser
            self._hr = _hiredis.Reader(notEnoughData=_NEED)
            return None
        if len(packs) == 1:
            if packs[0] != data:
                return None
            return [(cmds[0], 0, len(data))], data
        if b"".join(packs) != data:
            return None
        ends = list(accumulate(map(len, packs)))
        return list(zip(cmds, [0, *ends[:-1]], ends)), data

    def _scan(self) -> tuple[list[tuple[list[bytes], int, int]], bytes]:
        buf = self._buf
        n = len(buf)
        pos = 0
        cmds: list[tuple[list[bytes], int, int]] = []
        prefix = self._consumed_len  # bytes of the first request scanned in earlier feeds
        args = self._args
        remaining = self._remaining
        cmd_start = -prefix  # where the current request begins in buf (negative: in an earlier feed)
        max_bulk = self.max_bulk
        find = buf.find
        error = None
        need = 0
        try:
            while True:
                if args is None:
                    if pos >= n:
                        break
                    cmd_start = pos
                    if buf[pos] != 42:  # not '*': an inline command
                        nl = find(b"\n", pos)
                        if nl >= 0 and find(b"\x00", pos, nl) >= 0:
                            nl = -1  # Redis finds the newline with strchr(), which stops at a NUL
                        if nl < 0:
                            if n - pos > MAX_INLINE:
                                raise ProtocolError("Protocol error: too big inline request")
                            need = n - pos + 1
                            break
                        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
                        line_args = split_inline(buf[pos:end])
                        pos = nl + 1
                        if line_args:
                            cmds.append((line_args, prefix + cmd_start, prefix + pos))
                        continue
                    nl = find(CRLF, pos)
                    if nl < 0:
                        if n - pos > MAX_INLINE:
                            raise ProtocolError("Protocol error: too big mbulk count string")
                        need = n - pos + 1
                        break
                    try:
                        count = _strict_int(buf[pos + 1 : nl], True)
                    except ValueError:
                        raise ProtocolError("Protocol error: invalid multibulk length") from None
                    if count > MAX_MULTIBULK:
                        raise ProtocolError("Protocol error: invalid multibulk length")
                    if count > UNAUTH_MAX_ARGS and self.unauth:
                        raise ProtocolError("Protocol error: unauthenticated multibulk length")
                    pos = nl + 2
                    if count <= 0:
                        continue  # Redis skips empty multibulks
                    args = []
                    remaining = count
                bulk_start = bulk_end = -1
                while remaining:
                    if pos >= n:
                        need = 1
                        break
                    if buf[pos] != 36:  # '$'
                        raise ProtocolError(
                            "Protocol error: expected '$', got '%s'" % chr(buf[pos])
                        )
                    nl = find(CRLF, pos)
                    if nl < 0:
                        if n - pos > MAX_INLINE:
                            raise ProtocolError("Protocol error: too big bulk count string")
                        need = n - pos + 1
                        break
                    try:
                        blen = _strict_int(buf[pos + 1 : nl], False)
                    except ValueError:
                        raise ProtocolError("Protocol error: invalid bulk length") from None
                    if blen > max_bulk:
                        raise ProtocolError("Protocol error: invalid bulk length")
                    if blen > UNAUTH_MAX_BULK and self.unauth:
                        raise ProtocolError("Protocol error: unauthenticated bulk length")
                    start = nl + 2
                    end = start + blen
                    if end + 2 > n:
                        need = end + 2 - pos
                        bulk_start, bulk_end = start, end
                        break
                    if buf[end : end + 2] != CRLF:
                        raise ProtocolError("Protocol error: expected CRLF after bulk data")
                    args.append(buf[start:end])
                    pos = end + 2
                    remaining -= 1
                if remaining:  # incomplete request
                    if not self._nostream and self._stream_start(
                        buf, n, args, cmd_start, pos, remaining, bulk_start, bulk_end
                    ):
                        args = None
                        pos = n
                        need = 0
                    break
                cmds.append((args, prefix + cmd_start, prefix + pos))
                args = None
        except ProtocolError as exc:
            error = str(exc)

        # Everything before the first complete request's end is returned; the rest stays.
        if cmds:
            last_end = cmds[-1][2] - prefix
            if self._consumed:
                raw = b"".join(self._consumed) + buf[:last_end]
                self._consumed.clear()
                self._consumed_len = 0
            else:
                raw = buf[:last_end]
        else:
            raw = b""
            last_end = 0
        if error is not None:
            self.error = error
            self._buf = b""
            self._args = None
            return cmds, raw
        if args is not None:
            # A multibulk in progress: bytes up to ``pos`` are scanned and belong to it.
            begin = cmd_start if cmd_start >= last_end else last_end  # last_end >= 0
            if pos > begin:
                part = buf[begin:pos]
                self._consumed.append(part)
                self._consumed_len += len(part)
            self._buf = buf[pos:]
            self._args = args
            self._remaining = remaining
            self._need = need
        else:
            self._buf = buf[pos:] if pos < n else b""
            self._args = None
            self._need = need
            self._nostream = False
        if self.buffered > self.max_query:
            self.error = "Protocol error: query buffer limit exceeded"
        return cmds, raw

    def _stream_start(
        self, buf: bytes, n: int, args: list[bytes], cmd_start: int, pos: int, remaining: int,
        bulk_start: int, bulk_end: int,
    ) -> bool:
        """An incomplete request: start streaming it if it is large and may be streamed."""
        received = n - cmd_start if cmd_start >= 0 else self._consumed_len + n
        expected = received + (bulk_end + 2 - n if bulk_end >= 0 else 0)
        if (expected < STREAM_MIN and remaining < STREAM_ARGS) or not self.stream_ok():
            return False
        if not args or args[0].lower() not in self.streamable:
            self._nostream = True  # held whole, as before (within max_query)
            return False
        head_args = list(args)
        if bulk_end >= 0 and n - bulk_start < min(HEAD_ARG, bulk_end - bulk_start):
            return False  # the start of the argument that is arriving first (a key, for patterns)
        if bulk_end >= 0:
            head_args.append(buf[bulk_start : min(n, bulk_start + HEAD_ARG)])
            self._s_left = max(0, bulk_end - n)
            self._s_crlf = 2 - max(0, n - bulk_end)
            if self._s_crlf == 1 and buf[bulk_end] != 13:
                raise ProtocolError("Protocol error: expected CRLF after bulk data")
            self._s_hdr = b""
        else:
            self._s_left = self._s_crlf = 0
            self._s_hdr = buf[pos:n]
        self._s_bulks = remaining
        if cmd_start >= 0:
            head = buf[cmd_start:n]
        else:
            head = b"".join(self._consumed) + buf[:n]
            self._consumed.clear()
            self._consumed_len = 0
        self.head = (head_args, head)
        self.streaming = True
        return True

    def _skip(self, data: bytes) -> int:
        """Streaming: frame the rest of the request without keeping it. Returns how many bytes of
        ``data`` belong to it (all of them while it goes on); sets :attr:`error` on bad input."""
        n = len(data)
        pos = 0
        try:
            while pos < n:
                if self._s_left:
                    take = min(self._s_left, n - pos)
                    pos += take
                    self._s_left -= take
                    continue
                if self._s_crlf:
                    if data[pos] != (13 if self._s_crlf == 2 else 10):
                        raise ProtocolError("Protocol error: expected CRLF after bulk data")
                    pos += 1
                    self._s_crlf -= 1
                    if not self._s_crlf:
                        self._s_bulks -= 1
                        if not self._s_bulks:
                            self.streaming = False
                            return pos
                    continue
                # the next bulk's header
                hdr = self._s_hdr
                if not hdr and data[pos] != 36:  # '$'
                    raise ProtocolError("Protocol error: expected '$', got '%s'" % chr(data[pos]))
                if hdr.endswith(b"\r") and data[pos] == 10:
                    line = hdr[:-1]
                    pos += 1
                else:
                    nl = data.find(CRLF, pos, pos + MAX_INLINE + 2)
                    if nl < 0:
                        self._s_hdr = hdr + data[pos : pos + MAX_INLINE + 2]
                        if len(self._s_hdr) > MAX_INLINE:
                            raise ProtocolError("Protocol error: too big bulk count string")
                        return n
                    line = hdr + data[pos:nl]
                    pos = nl + 2
                self._s_hdr = b""
                try:
                    blen = _strict_int(line[1:], False)
                except ValueError:
                    raise ProtocolError("Protocol error: invalid bulk length") from None
                if blen > self.max_bulk:
                    raise ProtocolError("Protocol error: invalid bulk length")
                self._s_left = blen
                self._s_crlf = 2
        except ProtocolError as exc:
            self.error = str(exc)
            self.streaming = False
        return pos


_UNLIMITED = 1 << 62


def _never() -> bool:
    return False


def expand(items: list[Any], raw: bytes) -> list[tuple[list[bytes], int, int]]:
    """The commands of a :meth:`RequestParser.feed` result, runs framed again one by one (exactly: the
    bytes of a run are known to be whole, strict requests)."""
    if all(len(it) == 3 for it in items):
        return items
    out: list[tuple[list[bytes], int, int]] = []
    for it in items:
        if len(it) == 3:
            out.append(it)
            continue
        start = it[3]
        # no limits here: these bytes passed the limits of the parser that framed them, which may
        # be larger than the defaults (--max-bulk)
        cmds, _ = RequestParser(max_bulk=_UNLIMITED, max_query=_UNLIMITED).feed(raw[start : it[4]])
        out.extend([(a, s + start, e + start) for a, s, e in cmds])
    return out


class Frame(NamedTuple):
    """One complete top-level reply inside the chunk just fed to :class:`ReplyFramer`.

    The framer returns plain tuples of this shape (cheaper to build); index them or wrap them.
    """

    end: int  # offset just past the frame in that chunk
    kind: int  # KIND_*
    head: bytes | None  # first element of an array or push, when it is a short string
    num: int | None  # third element of an array or push, when it is an integer


KIND_NORMAL = 0
KIND_ERROR = 1  # '-' or '!' blob error
KIND_PUSH = 2  # RESP3 '>'
KIND_ARRAY = 3  # top-level '*' (a RESP2 pub/sub message is one)

_SIMPLE = frozenset(b"+-:_,#(")
_BULK = frozenset(b"$=!")
_AGG = frozenset(b"*~>%|")
HEAD_MAX = 64


# The first element of a pub/sub message, and of a subscription confirmation (RESP2 arrays, RESP3 pushes)
MESSAGE_KINDS = frozenset((b"message", b"pmessage", b"smessage"))
CONFIRM_KINDS = frozenset(
    (b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe")
)
_PUBSUB_HEADS = MESSAGE_KINDS | CONFIRM_KINDS  # proxy/_speedups.c has the same list (PUBSUB_KINDS)


class PyReplyFramer:
    """Incremental framer for server replies, RESP2 and RESP3.

    ``feed(data)`` returns the list of :class:`Frame` completed in ``data``. Bulk payloads are skipped, not
    buffered, so a 50 MB reply costs no memory here; only a header line split across chunks (at most
    ``MAX_INLINE`` bytes) or a short head element is held over. After a feed, :attr:`plain` tells whether
    every frame was an ordinary reply: no error, no push, no array shaped like a pub/sub message.

    :data:`ReplyFramer` is this class, or its C twin from proxy/_speedups.c when that is built.
    """

    __slots__ = ("_stack", "_attr", "_skip", "_partial", "_kind", "_idx", "_head", "_num", "plain")

    def __init__(self) -> None:
        self._stack: list[int] = []  # elements still expected, per open aggregate
        self._attr: list[bool] = []  # whether each open aggregate is an attribute
        self._skip = 0  # payload bytes (with CRLF) of the current bulk still to pass
        self._partial = b""  # an incomplete header line (or short head bulk) from the last chunk
        self._kind = KIND_NORMAL
        self._idx = 0  # completed elements of the top-level aggregate
        self._head: bytes | None = None
        self._num: int | None = None
        self.plain = True

    @property
    def in_frame(self) -> bool:
        return bool(self._stack or self._skip or self._partial)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes | None, int | None]]:
        frames: list = []
        self.plain = True
        skip = self._skip
        if skip:
            if skip >= len(data):
                self._skip = skip - len(data)
                if self._skip == 0:
                    self._element_done(frames, len(data))
                return frames
            pos = skip
            self._skip = 0
            self._element_done(frames, pos)
            off = 0
            buf = data
        elif self._partial:
            buf = self._partial + data
            off = len(self._partial)
            self._partial = b""
            pos = 0
        else:
            buf = data
            off = 0
            pos = 0
        n = len(buf)
        stack = self._stack
        find = buf.find
        try:
            while pos < n:
                t = buf[pos]
                if not stack:
                    # Fast path for the most common top-level replies.
                    if t == 43 or t == 58:  # '+', ':'
                        nl = find(CRLF, pos)
                        if nl < 0:
                            break
                        pos = nl + 2
                        frames.append((pos - off, KIND_NORMAL, None, None))
                        continue
                    if t == 36:  # '$'
                        nl = find(CRLF, pos)
                        if nl < 0:
                            break
                        blen = int(buf[pos + 1 : nl])
                        end = nl + 2 if blen < 0 else nl + 4 + blen
                        if end <= n:
                            pos = end
                            frames.append((pos - off, KIND_NORMAL, None, None))
                            continue
                nl = find(CRLF, pos)
                if nl < 0:
                    break
                if t in _SIMPLE:
                    if not stack:
                        self._kind = KIND_ERROR if t == 45 else KIND_NORMAL
                    elif len(stack) == 1 and not self._attr[0]:
                        if self._idx == 0 and t == 43 and nl - pos - 1 <= HEAD_MAX:
                            self._head = buf[pos + 1 : nl]
                        elif self._idx == 2 and t == 58:
                            self._num = int(buf[pos + 1 : nl])
                    pos = nl + 2
                    self._element_done(frames, pos - off)
                elif t in _BULK:
                    blen = int(buf[pos + 1 : nl])
                    if not stack:
                        self._kind = KIND_ERROR if t == 33 else KIND_NORMAL
                    if blen < 0:
                        pos = nl + 2
                        self._element_done(frames, pos - off)
                        continue
                    if len(stack) == 1 and self._idx == 0 and blen <= HEAD_MAX and not self._attr[0]:
                        end = nl + 2 + blen
                        if end + 2 > n:
                            break  # keep the short head whole: wait for more
                        self._head = buf[nl + 2 : end]
                        pos = end + 2
                        self._element_done(frames, pos - off)
                        continue
                    end = nl + 4 + blen
                    if end <= n:
                        pos = end
                        self._element_done(frames, pos - off)
                    else:
                        self._skip = end - n
                        pos = n
                elif t in _AGG:
                    count = int(buf[pos + 1 : nl])
                    pos = nl + 2
                    if t == 37 or t == 124:  # '%' map, '|' attribute: key/value pairs
                        count *= 2
                    if not stack and t != 124:
                        if count < 0:  # *-1: a null, not an array (EXEC aborted by WATCH)
                            self._kind = KIND_NORMAL
                        else:
                            self._kind = KIND_PUSH if t == 62 else KIND_ARRAY if t == 42 else KIND_NORMAL
                        self._idx = 0
                        self._head = None
                        self._num = None
                    if count <= 0:
                        if t != 124:
                            self._element_done(frames, pos - off)
                        continue
                    stack.append(count)
                    self._attr.append(t == 124)
                else:
                    raise ProtocolError("Protocol error: unexpected reply type byte %r" % chr(t))
        except ValueError:
            raise ProtocolError("Protocol error: bad length in reply") from None
        if pos < n:
            rest = buf[pos:]
            if len(rest) > MAX_INLINE:
                raise ProtocolError("Protocol error: reply header too long")
            self._partial = rest
        return frames

    def _element_done(self, frames: list, end: int) -> None:
        """An element (scalar or aggregate) just ended at ``end``: walk up the open aggregates."""
        stack = self._stack
        attr = self._attr
        while stack:
            stack[-1] -= 1
            if len(stack) == 1 and not attr[0]:
                self._idx += 1
            if stack[-1] > 0:
                return
            stack.pop()
            if attr.pop():
                return  # an attribute ends: it prefixes the next element, which is still to come
        kind = self._kind
        if kind and (kind != KIND_ARRAY or (self._head is not None and self._head.lower() in _PUBSUB_HEADS)):
            self.plain = False
        frames.append((end, kind, self._head, self._num))
        self._kind = KIND_NORMAL
        self._head = None
        self._num = None
        self._idx = 0


ReplyFramer: Any = _speedups.ReplyFramer if _speedups is not None else PyReplyFramer


def describe_non_resp(data: bytes) -> str:
    """What came back from an "upstream" that does not speak RESP, for a log line and an error
    reply: a TLS record (a rediss:// server addressed as redis://), or the first printable bytes."""
    if len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03:
        return "upstream looks like TLS (it answered with a TLS record): use rediss://"
    line = data.split(b"\n", 1)[0].rstrip(b"\r")[:40]
    shown = "".join(chr(c) if 32 <= c < 127 else "\\x%02x" % c for c in line)
    return f"upstream does not speak RESP: got '{shown}'"


def encode_command(args: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(CRLF)
    return b"".join(out)


def encode_error(message: str) -> bytes:
    """A RESP error line; CR and LF in the message are replaced so the frame stays one line."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF
