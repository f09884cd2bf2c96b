"""Which commands clients may not send through the proxy: ``[commands] deny`` in the config file,
``--deny-commands`` / ``RESPMETER_DENY_COMMANDS`` (comma separated).

A plain object: a list of entries in, answers out, no I/O. Entries use commandstats naming and are
case-insensitive:

* ``config``: a command; a container means all of its subcommands, the container alone and any
  subcommand the command table does not know (a newer server's);
* ``acl|list``: one subcommand;
* ``!acl|whoami``: an exception: re-allows what the other entries deny (order does not matter);
* ``@default``: the default list, :data:`DEFAULT`.

An empty list denies nothing. Names outside the command table, groups other than ``@default`` and
exceptions that re-allow nothing are errors.

A denied command is answered ``-NOPERM respmeter: <name> is disabled by the proxy (commands.deny)``,
``<name>`` in commandstats naming (``config|get``), and never reaches the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from . import commands as cmdtable

# What a proxy user must never do to a server that is shared or whose credentials the proxy holds:
# what reads or changes credentials and configuration, and what takes the server down or over.
# Each entry's reason is in the README ("Command policy").
DEFAULT: tuple[str, ...] = (
    "config",  # CONFIG GET requirepass/masterauth; CONFIG SET dir/dbfilename writes files
    "acl",  # ACL LIST/GETUSER show password hashes, ACL SETUSER makes users
    "!acl|whoami",  # ... but who am I is harmless, and clients ask it
    "module",  # MODULE LOAD runs arbitrary code inside the server
    "debug",  # DEBUG SEGFAULT, RELOAD, SLEEP
    "shutdown",
    "save",  # blocks every client until the whole dataset is on disk
    "replicaof",  # make the server a replica of another one: its data is replaced
    "slaveof",
    "failover",
    "sync",  # the replication stream: the whole dataset, then every write
    "psync",
    "replconf",
    "cluster",  # takes over the cluster's topology; cluster clients cannot work through one upstream
    "client|kill",  # disconnects every other client, replicas included
    "client|pause",  # the server answers nobody for as long as asked
    "script|debug",  # SCRIPT DEBUG SYNC blocks the server for the whole debugging session
)

DEFAULT_GROUP = "@default"
SETTING = "commands.deny"


class CommandPolicyError(ValueError):
    """An invalid deny list; ``problems`` is every (entry index, message)."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def split_spec(text: str) -> list[str]:
    """The entries of a comma-separated deny list (the flag's and the environment variable's form)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _members(table: dict[str, cmdtable.CommandInfo], name: str) -> tuple[set[str], bool]:
    """The commandstats names an entry covers, and whether it is a container (then unknown
    subcommands are covered too)."""
    info = table[name]
    if not info.subcommands:
        return {name}, False
    subs = {sub.name for sub in info.subcommands.values()}
    return {name} | subs, True


def _resolve(entries: Iterable[str]) -> tuple[set[str], set[str], list[tuple[int, str]]]:
    """(denied names, wholly denied containers, problems)."""
    table = cmdtable.all_commands()
    problems: list[tuple[int, str]] = []
    denies: list[tuple[int, str]] = []
    allows: list[tuple[int, str]] = []
    for i, raw in enumerate(entries):
        if not isinstance(raw, str):
            problems.append((i, f"must be a string, not {raw!r}"))
            continue
        entry = raw.strip().lower()
        if not entry:
            problems.append((i, "empty entry"))
            continue
        exception = entry.startswith("!")
        name = entry[1:].strip() if exception else entry
        if name == DEFAULT_GROUP:
            if exception:
                problems.append((i, f"{raw!r}: {DEFAULT_GROUP} cannot be an exception"))
                continue
            denies.extend((i, d) for d in DEFAULT if not d.startswith("!"))
            allows.extend((i, d[1:]) for d in DEFAULT if d.startswith("!"))
            continue
        if name.startswith("@"):
            problems.append((i, f"{raw!r}: unknown group (the only one is {DEFAULT_GROUP})"))
            continue
        if name not in table:
            hint = ""
            if " " in name and "|".join(name.split()) in table:
                hint = f" (name subcommands as {'|'.join(name.split())})"
            problems.append((i, f"{raw!r}: unknown command{hint}"))
            continue
        (allows if exception else denies).append((i, name))
    denied: set[str] = set()
    whole: set[str] = set()
    for _i, name in denies:
        members, container = _members(table, name)
        denied |= members
        if container:
            whole.add(name)
    denied_by_entries = set(denied)
    for i, name in allows:
        members, container = _members(table, name)
        if not members & denied_by_entries:
            problems.append((i, f"'!{name}' re-allows nothing: no other entry denies {name}"))
            continue
        denied -= members
        if container:
            whole.discard(name)
    problems.sort(key=lambda p: p[0])
    return denied, whole, problems


def entry_problems(entries: Iterable[str]) -> list[tuple[int, str]]:
    """Every problem of a deny list as (entry index, message); empty when it is valid."""
    return _resolve(list(entries))[2]


def deny_spec(text: str) -> str:
    """The ``--deny-commands`` option's type: a valid comma-separated deny list, as given."""
    problems = entry_problems(split_spec(text))
    if problems:
        raise argparse.ArgumentTypeError("; ".join(msg for _, msg in problems))
    return text


class CommandPolicy:
    """The commands clients may not send. ``denied(name)`` is the reply for a denied command (bytes)
    or None; ``slow_names`` are the names a session must hand to the policy one by one instead of
    forwarding them on its fast path."""

    __slots__ = ("_replies", "_whole", "denied_names", "slow_names")

    def __init__(self, entries: Iterable[str] = DEFAULT) -> None:
        denied, whole, problems = _resolve(list(entries))
        if problems:
            raise CommandPolicyError(problems)
        self._replies = {name: _reply(name) for name in denied}
        # the container's own word, as a client may spell it, for subcommands the table does not know
        self._whole: dict[bytes, bytes] = {}
        for name in whole:
            self._whole[name.encode()] = self._whole[name.upper().encode()] = self._replies[name]
        self.denied_names = frozenset(denied)
        self.slow_names = frozenset(denied | ({cmdtable.UNKNOWN} if whole else set()))

    @classmethod
    def from_spec(cls, text: str) -> CommandPolicy:
        """From the comma-separated form (``--deny-commands``, ``RESPMETER_DENY_COMMANDS``)."""
        return cls(split_spec(text))

    def __bool__(self) -> bool:
        return bool(self._replies)

    def denied(self, name: str) -> bytes | None:
        """The NOPERM reply when the command named ``name`` (commandstats naming) is denied."""
        return self._replies.get(name)

    def check(self, args: list[bytes], name: str) -> bytes | None:
        """Like :meth:`denied`, for a command as received: a subcommand the table does not know
        (``name`` is ``unknown``) of a wholly denied container is denied as the container."""
        reply = self._replies.get(name)
        if reply is None and name == cmdtable.UNKNOWN and self._whole and args:
            reply = self._whole.get(args[0])
            if reply is None:
                reply = self._whole.get(args[0].lower())
        return reply

    def describe(self) -> str:
        """The policy in a few words, for the startup log."""
        if not self._replies:
            return "no command is denied"
        table = cmdtable.all_commands()
        tops = sorted({n.split("|", 1)[0] for n in self.denied_names})
        parts = []
        for top in tops:
            info = table[top]
            if info.subcommands and top not in self.denied_names:
                parts.extend(sorted(n for n in self.denied_names if n.startswith(top + "|")))
            elif info.subcommands:
                allowed = sorted({s.name for s in info.subcommands.values()} - self.denied_names)
                parts.append(top + (f" (but {', '.join(allowed)})" if allowed else ""))
            else:
                parts.append(top)
        return "denied: " + ", ".join(parts)


def _reply(name: str) -> bytes:
    return f"-NOPERM respmeter: {name} is disabled by the proxy ({SETTING})\r\n".encode()


__all__ = [
    "DEFAULT",
    "DEFAULT_GROUP",
    "CommandPolicy",
    "CommandPolicyError",
    "deny_spec",
    "entry_problems",
    "split_spec",
]
