"""Tests for proxy/pinning.py: which commands take a client out of the shared upstream pool."""

from __future__ import annotations

import pytest

from proxy import pinning
from proxy.commands import all_commands
from proxy.pinning import PIN_NAMES, PIN_RULES, SHARED, pins
from proxy.resp import CONFIRM_KINDS


def cmd(line: str) -> list[bytes]:
    return [w.encode() for w in line.split()]


def spellings(line: str) -> list[list[bytes]]:
    """The command in lower, upper and mixed case (name and subcommand word; arguments kept)."""
    words = line.split()
    head = 2 if words[0].lower() in ("client", "script", "pubsub", "object", "config") else 1
    mixed = [w[:1].upper() + w[1:].lower() if i < head else w for i, w in enumerate(words)]
    return [
        cmd(" ".join([w.lower() if i < head else w for i, w in enumerate(words)])),
        cmd(" ".join([w.upper() if i < head else w for i, w in enumerate(words)])),
        cmd(" ".join(mixed)),
    ]


PINNING = [
    # blocking
    ("BLPOP q 0", "blocking"),
    ("BRPOP q 1", "blocking"),
    ("BLMOVE a b LEFT RIGHT 0", "blocking"),
    ("BLMPOP 0 1 q LEFT", "blocking"),
    ("BRPOPLPUSH a b 0", "blocking"),
    ("BZPOPMIN z 0", "blocking"),
    ("BZPOPMAX z 0", "blocking"),
    ("BZMPOP 0 1 z MIN", "blocking"),
    ("WAIT 1 0", "blocking"),
    ("WAITAOF 1 0 0", "blocking"),
    ("XREAD BLOCK 0 STREAMS s $", "blocking"),
    ("XREAD COUNT 10 BLOCK 100 STREAMS s 0", "blocking"),
    ("XREAD COUNT 10 block 100 STREAMS s 0", "blocking"),
    ("XREADGROUP GROUP g c BLOCK 0 STREAMS s >", "blocking"),
    ("XREADGROUP GROUP g c COUNT 1 NOACK Block 5 STREAMS s >", "blocking"),
    # pub/sub
    ("SUBSCRIBE ch", "pubsub"),
    ("PSUBSCRIBE ch*", "pubsub"),
    ("SSUBSCRIBE ch", "pubsub"),
    ("UNSUBSCRIBE", "pubsub"),
    ("PUNSUBSCRIBE", "pubsub"),
    ("SUNSUBSCRIBE", "pubsub"),
    # transactions
    ("MULTI", "transaction"),
    ("WATCH k", "transaction"),
    ("EXEC", "transaction"),
    ("DISCARD", "transaction"),
    ("UNWATCH", "transaction"),
    # connection state
    ("CLIENT TRACKING ON", "connection state"),
    ("CLIENT REPLY OFF", "connection state"),
    ("CLIENT ID", "connection state"),
    ("CLIENT LIST", "connection state"),
    ("CLIENT KILL ID 7", "connection state"),
    ("CLIENT NO-EVICT ON", "connection state"),
    ("CLIENT NO-TOUCH ON", "connection state"),
    ("CLIENT UNBLOCK 7", "connection state"),
    ("CLIENT INFO", "connection state"),
    ("CLIENT CACHING YES", "connection state"),
    ("CLIENT GETREDIR", "connection state"),
    ("CLIENT TRACKINGINFO", "connection state"),
    ("CLIENT CAPA redirect", "connection state"),
    ("READONLY", "connection state"),
    ("READWRITE", "connection state"),
    ("ASKING", "connection state"),
    ("RESET", "connection state"),
    ("SCRIPT DEBUG YES", "connection state"),
    # the rest
    ("MONITOR", "monitor"),
    ("SYNC", "replication"),
    ("PSYNC ? -1", "replication"),
    ("REPLCONF listening-port 6380", "replication"),
    ("DEBUG SLEEP 0", "debug"),
    ("SELECT 1", "select db"),
    ("SELECT 15", "select db"),
    ("SELECT x", "select db"),
    ("SELECT", "select db"),
    ("SELECT 0 1", "select db"),
    ("NOSUCHCOMMAND a b", "unknown command"),
    ("JSON.GET k", "unknown command"),
    ("CLIENT NOSUCHSUB", "unknown command"),
    ("CONFIG NOSUCHSUB x", "unknown command"),
]

SHARING = [
    "GET k",
    "SET k v",
    "INCR k",
    "PUBLISH ch msg",
    "SPUBLISH ch msg",
    "PUBSUB CHANNELS",
    "PUBSUB NUMSUB ch",
    "PUBSUB SHARDCHANNELS",
    "EVAL return 0 0",
    "EVALSHA abc 0",
    "FCALL f 0",
    "SCRIPT LOAD return",
    "FUNCTION LIST",
    "PING",
    "ECHO hi",
    "HELLO 3",
    "HELLO",
    "AUTH user pass",
    "QUIT",
    "CLIENT SETNAME me",
    "CLIENT SETINFO LIB-NAME redis-py",
    "CLIENT GETNAME",
    "CLIENT MAINT_NOTIFICATIONS ON",
    "CLIENT HELP",
    "CLIENT PAUSE 10",
    "CLIENT UNPAUSE",
    "SELECT 0",
    "XREAD STREAMS s 0",
    "XREAD COUNT 5 STREAMS s 0",
    "XREAD COUNT 5 STREAMS block 0",  # a stream named "block"
    "XREADGROUP GROUP g c STREAMS s >",
    "XREADGROUP GROUP block c STREAMS s >",  # a group named "block"
    "XREADGROUP GROUP g block COUNT 1 STREAMS s >",  # a consumer named "block"
    "XADD s * f v",
    "OBJECT FREQ k",
    "CONFIG GET maxmemory",
    "INFO",
    "DBSIZE",
    "COMMAND",
    "COMMAND COUNT",
    "CLIENT",  # a container alone: an arity error
    "SHUTDOWN",
    "SWAPDB 0 1",
    "ACL WHOAMI",
]


@pytest.mark.parametrize(("line", "reason"), PINNING)
def test_pins(line: str, reason: str) -> None:
    for args in spellings(line):
        assert pins(args) == reason, args


@pytest.mark.parametrize("line", SHARING)
def test_shares(line: str) -> None:
    for args in spellings(line):
        assert pins(args) is None, args


def test_select_zero_spellings() -> None:
    assert pins([b"SELECT", b"0"]) is None
    assert pins([b"select", b"00"]) is None  # an error reply from Redis: no state change either
    assert pins([b"SELECT", b"-1"]) == "select db"
    assert pins([b"SELECT", b"\xff"]) == "select db"
    assert pins([b"SELECT", b"9" * 5000]) == "select db"  # beyond int()'s digit limit


def test_xread_edge_cases() -> None:
    assert pins(cmd("XREAD BLOCK")) == "blocking"  # a syntax error upstream; pinning is harmless
    assert pins(cmd("XREAD")) is None
    assert pins(cmd("XREADGROUP GROUP g c")) is None
    assert pins(cmd("xread streams s block")) is None  # after STREAMS it is a key or an id


def test_empty_and_unknown() -> None:
    assert pins([]) == "unknown command"
    assert pins([b""]) == "unknown command"
    assert pins([b"GeT\x00"]) == "unknown command"


def test_every_blocking_command_pins() -> None:
    blocking = {name for name, info in all_commands().items() if info.blocking}
    assert {"blpop", "brpop", "blmove", "bzpopmin", "xread", "xreadgroup", "waitaof"} <= blocking
    for name in blocking:
        assert PIN_RULES[name] == "blocking"
        args = [w.encode() for w in name.split("|")] + [b"k", b"0"]
        if name in ("xread", "xreadgroup"):
            args = [name.encode(), b"GROUP", b"g", b"c", b"BLOCK", b"0", b"STREAMS", b"s", b">"]
        assert pins(args) == "blocking", name
        assert pins([a.upper() for a in args[:1]] + args[1:]) == "blocking", name


def test_pubsub_rules_are_the_subscribe_family() -> None:
    subscribe = {k.decode() for k in CONFIRM_KINDS}
    assert {n for n, r in PIN_RULES.items() if r == "pubsub"} == subscribe
    flagged = {name for name, info in all_commands().items() if info.pubsub}
    assert flagged - subscribe <= set(SHARED)  # PUBLISH, SPUBLISH, PUBSUB * are exempted by name


def test_every_known_command_pins_or_shares_by_the_rules() -> None:
    """pins() agrees with PIN_RULES for every command in the table (unconditional rules)."""
    commands = all_commands()
    for name, info in commands.items():
        if info.subcommands:
            continue
        args = [w.encode() for w in name.split("|")]
        expected = PIN_RULES.get(name)
        if name in ("select", "xread", "xreadgroup"):
            continue  # conditional: tested above
        assert pins(args) == expected, name
        assert pins([a.upper() for a in args]) == expected, name


def test_rule_table_is_consistent() -> None:
    commands = all_commands()
    assert set(PIN_RULES) <= set(commands), set(PIN_RULES) - set(commands)
    assert set(SHARED) <= set(commands), set(SHARED) - set(commands)
    assert not set(PIN_RULES) & set(SHARED)
    assert set(PIN_RULES.values()) <= {
        "blocking", "pubsub", "transaction", "connection state",
        "monitor", "replication", "debug", "select db",
    }
    # every top-level name that can pin is in PIN_NAMES (a fast path must stop at it)
    for name in PIN_RULES:
        assert name.split("|")[0] in PIN_NAMES, name
    assert "get" not in PIN_NAMES and "publish" not in PIN_NAMES


def test_transactions_and_connection_group_are_derived_from_the_table() -> None:
    for name, info in all_commands().items():
        if info.subcommands or name in SHARED:
            continue
        if info.group == "transactions":
            assert PIN_RULES[name] == "transaction", name
        if info.group == "connection":
            assert name in PIN_RULES, name


def test_hot_path_dicts_hold_both_spellings() -> None:
    # the hot-path dicts hold both spellings of every top-level name
    assert pinning._TOP[b"get"] is None and pinning._TOP[b"GET"] is None
    assert pinning._TOP[b"client"] is pinning._TOP[b"CLIENT"]
