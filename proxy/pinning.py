"""Which commands take a client out of the shared upstream pool ("pin" it), as data.

With ``--upstream-pool N`` clients in their default state share N upstream connections. A client
gets a dedicated upstream connection of its own at the first command whose meaning depends on the
connection it runs on: the server would block that connection, put it in a mode (subscribed,
MULTI, MONITOR, tracking, another db, ...) or answer about it. :func:`pins` tells which, on the raw
``bytes`` the client sent; :data:`PIN_RULES` is every rule, by commandstats name, with its reason.

How the rules are derived (once, at import, from :mod:`proxy.commands`)
-----------------------------------------------------------------------
* **blocking**: every command the table flags ``blocking`` (BLPOP, BRPOP, BLMOVE, BLMPOP,
  BRPOPLPUSH, BZPOPMIN, BZPOPMAX, BZMPOP, WAITAOF, XREAD, XREADGROUP), plus WAIT, which blocks too
  but is not flagged. XREAD and XREADGROUP block only with a BLOCK option (before STREAMS):
  without it they are ordinary reads and do not pin.
* **pubsub**: every command flagged ``pubsub`` (the SUBSCRIBE family) except those in
  :data:`SHARED`: PUBLISH, SPUBLISH and the PUBSUB introspection subcommands answer the same on
  any connection.
* **transaction**: the table's ``transactions`` group: MULTI and WATCH, and EXEC, DISCARD and
  UNWATCH too (arriving in the default state they would act on a connection shared with others).
* **connection state**: the table's ``connection`` group (CLIENT TRACKING, REPLY, ID, INFO, ...,
  RESET), except what :data:`SHARED` lists: the commands the proxy answers itself (HELLO, AUTH,
  QUIT, CLIENT SETNAME/SETINFO/MAINT_NOTIFICATIONS, SELECT 0; CLIENT GETNAME is to be), stateless
  ones (PING, ECHO, CLIENT HELP) and server-wide ones (CLIENT PAUSE/UNPAUSE). CLIENT LIST, KILL
  and UNBLOCK pin: they deal in upstream connection ids and addresses, which mean something to a
  client only about a connection of its own (CLIENT KILL skips the caller by default, CLIENT LIST
  shows it).
* what the flags cannot say, listed in :data:`_EXPLICIT`: MONITOR; READONLY, READWRITE and ASKING
  (per-connection cluster state); SCRIPT DEBUG (puts the connection in Lua debugging mode);
  SYNC, PSYNC and REPLCONF (the connection becomes a replication stream); DEBUG (a grab bag of
  admin subcommands, some about the caller, that the table does not split: rare, so it pins).
* **select db**: SELECT pins unless its argument is an integer equal to 0 (anything else that
  Python reads as 0, like ``00``, is an error reply from Redis: no state change either).
* **unknown command**: a name the table does not know (module commands such as JSON.GET or FT.*
  included), a subcommand it does not know (a newer CLIENT subcommand is most likely about the
  connection), and an empty command.

A container alone (``CLIENT``, ``COMMAND``) does not pin: it is an arity error, or, for COMMAND,
stateless. Everything else (GET, SET, EVAL, FUNCTION, SCRIPT LOAD, PUBLISH, OBJECT FREQ, ...)
shares. The table's ACL categories are not carried by :class:`proxy.commands.CommandInfo`; flags
and groups suffice.
"""

from __future__ import annotations

from typing import Callable

from . import commands as cmdtable

__all__ = ["PIN_RULES", "SHARED", "PIN_NAMES", "pins"]

BLOCKING = "blocking"
PUBSUB = "pubsub"
TRANSACTION = "transaction"
CONNECTION = "connection state"
MONITOR = "monitor"
REPLICATION = "replication"
DEBUG = "debug"
SELECT_DB = "select db"
UNKNOWN = "unknown command"

# Commands the derivation above would pin, that share a connection all the same: name -> why.
SHARED: dict[str, str] = {
    "publish": "connection-independent: posts to a channel",
    "spublish": "connection-independent: posts to a shard channel",
    "pubsub|channels": "server-wide introspection",
    "pubsub|numpat": "server-wide introspection",
    "pubsub|numsub": "server-wide introspection",
    "pubsub|shardchannels": "server-wide introspection",
    "pubsub|shardnumsub": "server-wide introspection",
    "pubsub|help": "stateless",
    "hello": "answered by the proxy (proxy.handshake)",
    "auth": "answered by the proxy (proxy.gate)",
    "quit": "answered by the proxy",
    "client|setname": "answered by the proxy (proxy.handshake)",
    "client|setinfo": "answered by the proxy (proxy.handshake)",
    # (not answered locally yet: the pool must answer it from the name the session keeps)
    "client|getname": "to be answered by the proxy from the session's name (Session.set_name)",
    # (answered from the server's reply to OFF, which is what ON goes as: proxy.handshake.rewrite)
    "client|maint_notifications": "answered by the proxy (proxy.pool); every redis-py 8 client sends it",
    "client|help": "stateless",
    "client|pause": "server-wide: pauses all clients, whichever connection asks",
    "client|unpause": "server-wide",
    "ping": "stateless in the default state",
    "echo": "stateless",
}

# What flags and groups cannot express: name -> reason.
_EXPLICIT: dict[str, str] = {
    "wait": BLOCKING,  # blocks until replicas acknowledge; the table does not flag it
    "monitor": MONITOR,
    "readonly": CONNECTION,  # cluster: reads from a replica on this connection
    "readwrite": CONNECTION,
    "asking": CONNECTION,  # cluster: a one-shot flag on this connection
    "script|debug": CONNECTION,  # Lua debugging mode for this connection's next EVAL
    "sync": REPLICATION,
    "psync": REPLICATION,
    "replconf": REPLICATION,
    "debug": DEBUG,
}


_XREAD_VALUES = {b"COUNT": 1, b"GROUP": 2}  # option -> how many values follow it


def _xread_blocks(args: list[bytes]) -> bool:
    """XREAD/XREADGROUP with a BLOCK option before STREAMS (option values are skipped, so a group
    or consumer named "block" is not taken for the option)."""
    i = 1
    n = len(args)
    while i < n:
        word = args[i].upper()
        if word == b"STREAMS":
            return False
        if word == b"BLOCK":
            return True
        i += 1 + _XREAD_VALUES.get(word, 0)
    return False


def _select_pins(args: list[bytes]) -> bool:
    """SELECT pins unless it selects db 0."""
    if len(args) != 2:
        return True
    try:
        return int(args[1]) != 0
    except ValueError:
        return True


# Rules that hold only for some arguments: name -> predicate on the whole argument list.
_CONDITIONS: dict[str, Callable[[list[bytes]], bool]] = {
    "xread": _xread_blocks,
    "xreadgroup": _xread_blocks,
    "select": _select_pins,
}


def _derive() -> dict[str, str]:
    rules: dict[str, str] = {}
    for name, info in sorted(cmdtable.all_commands().items()):
        if info.subcommands or name in SHARED:
            continue  # a container alone: see the module docstring
        if info.blocking:
            rules[name] = BLOCKING
        elif info.pubsub:
            rules[name] = PUBSUB
        elif info.group == "transactions":
            rules[name] = TRANSACTION
        elif name == "select":
            rules[name] = SELECT_DB
        elif info.group == "connection":
            rules[name] = CONNECTION
    for name, reason in _EXPLICIT.items():
        rules.setdefault(name, reason)
    return rules


# Every pinning rule: commandstats name ("blpop", "client|tracking") -> reason. The names in
# _CONDITIONS pin only for some arguments (XREAD/XREADGROUP with BLOCK, SELECT of a db other
# than 0); anything the command table does not know pins with the reason "unknown command".
PIN_RULES: dict[str, str] = _derive()


# --------------------------------------------------------------------------
# The hot path: one dict per level, keyed by the lower- and upper-case spellings.
# A value is None (shares), a reason (pins), (reason, predicate) (pins when the predicate holds
# for the arguments), or, for a container, a dict of its subcommands with values of those kinds.
# --------------------------------------------------------------------------
def _entry(name: str):  # noqa: ANN202
    reason = PIN_RULES.get(name)
    if reason is not None and name in _CONDITIONS:
        return (reason, _CONDITIONS[name])
    return reason


def _build() -> tuple[dict, frozenset[str]]:
    top: dict = {}
    names: set[str] = set()
    by_name = cmdtable.all_commands()
    for name, info in by_name.items():
        if "|" in name:
            continue
        if info.subcommands:
            subs: dict = {}
            for word, sub in info.subcommands.items():
                entry = _entry(sub.name)
                subs[word] = entry
                if entry is not None:
                    names.add(name)
            value = subs
        else:
            value = _entry(name)
            if value is not None:
                names.add(name)
        raw = name.encode()
        top[raw.lower()] = value
        top[raw.upper()] = value
    return top, frozenset(names)


_TOP, PIN_NAMES = _build()
# PIN_NAMES: the top-level names for which pins() can answer other than None for a known
# subcommand (a fast path handing over runs of commands unseen must stop at these, and at every
# container and unknown name).
_MISSING = object()


def pins(args: list[bytes]) -> str | None:
    """Why this command needs a dedicated upstream connection, or None when it may run on a
    shared one. ``args`` is the command as the client sent it (name first, any case)."""
    if not args:
        return UNKNOWN
    name = args[0]
    rule = _TOP.get(name, _MISSING)
    if rule is None:
        return None
    if rule is _MISSING:
        rule = _TOP.get(name.lower(), _MISSING)
        if rule is None:
            return None
        if rule is _MISSING:
            return UNKNOWN
    if rule.__class__ is dict:
        if len(args) < 2:
            return None  # a container alone
        word = args[1]
        sub = rule.get(word, _MISSING)
        if sub is _MISSING:
            sub = rule.get(word.upper(), _MISSING)
            if sub is _MISSING:
                return UNKNOWN
        if sub is None:
            return None
        rule = sub
    if rule.__class__ is str:
        return rule
    reason, predicate = rule
    return reason if predicate(args) else None
