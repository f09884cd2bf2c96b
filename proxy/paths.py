"""Which path each command takes through a session, as data derived from the command table.

* SPECIAL: commands that change connection state the session tracks (subscriptions, MULTI, HELLO,
  CLIENT SETNAME/REPLY, MONITOR, RESET, QUIT, AUTH): looked at one by one.
* PLAIN: every other known top-level command; the request framer hands runs of them over whole
  (proxy/_speedups.c), and the session counts them in runs.
* STREAMABLE: the plain commands whose large requests are forwarded as they arrive (see
  proxy.resp.RequestParser) rather than held whole.
* fast_sets(): the same with the names a policy must see one by one (the denied ones) taken out.
"""

from __future__ import annotations

from . import commands as cmdtable
from .patterns import FAST_NAMES
from .resp import CONFIRM_KINDS

SUBSCRIBE_CMDS = frozenset(k.decode() for k in CONFIRM_KINDS)
# Commands that change connection state the session tracks (looked up once per command).
SPECIAL = frozenset(
    SUBSCRIBE_CMDS
    | {"multi", "exec", "discard", "reset", "hello", "client|setname", "monitor", "client|reply", "quit", "auth"}
)
NOT_DEFERRED = frozenset({"exec", "discard", "reset", "quit", "multi"})
UNTIMED = frozenset(SUBSCRIBE_CMDS | {"monitor", "wait", "waitaof", "xread", "xreadgroup"})


# WAIT and WAITAOF block for their timeout too, though the command table does not flag WAIT
WAITS = {"wait": 2, "waitaof": 3}  # name -> index of the timeout argument (milliseconds)
# Blocking commands: looked at one by one too (their timeout is an argument; see Session._route)
BLOCKING_NAMES = frozenset(
    {name for name, info in cmdtable.all_commands().items() if info.blocking} | set(WAITS)
)
# The names at which the session's fast path stops and hands over to the one-by-one path
STOP = SPECIAL | BLOCKING_NAMES


def plain_names() -> dict[bytes, tuple[tuple[str, bool], bool]]:
    """Commands the request framer may hand over as runs (see RequestParser): known top-level commands
    that are not containers, not blocking, and change no state the session tracks.
    name -> ((name, timed), keyed), keyed when the key pattern is the first argument's."""
    out = {}
    for name, info in cmdtable.all_commands().items():
        if "|" in name or info.subcommands or name in STOP:
            continue
        out[name.encode()] = ((name, True), name in FAST_NAMES)
    return out


PLAIN = plain_names()
# Commands whose large requests are streamed upstream as they arrive rather than held whole (see
# RequestParser): the plain ones.
STREAMABLE = frozenset(PLAIN)

_FAST_SETS: dict[frozenset[str], tuple[dict[bytes, tuple[tuple[str, bool], bool]], frozenset[str]]] = {}


def fast_sets(slow: frozenset[str]) -> tuple[dict[bytes, tuple[tuple[str, bool], bool]], frozenset[str]]:
    """PLAIN without ``slow`` (names the policy must see one by one), and STOP with them: the
    names the fast path hands over as runs, and those it stops at. Computed once per policy."""
    if not slow:
        return PLAIN, STOP
    sets = _FAST_SETS.get(slow)
    if sets is None:
        sets = _FAST_SETS[slow] = ({k: v for k, v in PLAIN.items() if v[0][0] not in slow}, STOP | slow)
    return sets


# Blocking commands whose timeout is known: name -> (index of the timeout argument, or None for
# XREAD's BLOCK option; the empty reply at the timeout in RESP2). on_cap = "idle" answers with that
# reply; an upstream that stalls is judged by that timeout (proxy.session).
BLOCKING = {
    "blpop": (-1, b"*-1\r\n"),
    "brpop": (-1, b"*-1\r\n"),
    "bzpopmin": (-1, b"*-1\r\n"),
    "bzpopmax": (-1, b"*-1\r\n"),
    "brpoplpush": (-1, b"$-1\r\n"),
    "blmove": (-1, b"$-1\r\n"),
    "blmpop": (1, b"*-1\r\n"),
    "bzmpop": (1, b"*-1\r\n"),
    "xread": (None, b"*-1\r\n"),
    "xreadgroup": (None, b"*-1\r\n"),
}


def block_timeout(name: str, args: list[bytes]) -> float | None:
    """The timeout of a blocking command in seconds (0: forever), or None when it has none (or it
    is not one of BLOCKING or WAITS)."""
    if name in WAITS:
        try:
            return max(0.0, int(args[WAITS[name]]) / 1000.0)
        except (ValueError, IndexError):
            return None
    if name not in BLOCKING:
        return None
    idx, _ = BLOCKING[name]
    try:
        if idx is None:  # XREAD/XREADGROUP ... BLOCK ms ...
            for i, a in enumerate(args):
                if a.upper() == b"BLOCK" and i + 1 < len(args):
                    return max(0.0, int(args[i + 1]) / 1000.0)
            return None
        return max(0.0, float(args[idx]))
    except (ValueError, IndexError):
        return None
