"""Redis command table: name resolution and key extraction for the proxy.

The data comes from ``proxy/command_table.json``, generated from a real Redis by
``scripts/gen_command_table.py`` (``python scripts/gen_command_table.py --spawn``)
and loaded once, at import.

Hot-path functions (:func:`lookup`, :func:`command_name`, :func:`key_indices`,
:func:`first_key`) do plain dict lookups on the raw ``bytes`` the client sent.
Every name is stored under its lower-case and upper-case spelling, so ``GET``
and ``get`` are a single dict hit; only mixed-case spellings (``Get``) pay for a
``.lower()`` and a second lookup.

Key specs
---------
``CommandInfo.key_specs`` is a tuple of :class:`KeySpec` named tuples (so plain
tuples too), in the order Redis reports them, which is the order keys are
returned in::

    KeySpec(bs, bs_arg, keyword, fk, fk1, fk2, fk3, flags, not_key)

    bs       "index" | "keyword" | "unknown"       begin_search type
    bs_arg   index: the argument index of the first key;
             keyword: ``startfrom`` (>0 search forward from there,
             <0 search backward from ``len(args) + startfrom``)
    keyword  upper-case keyword as bytes (b"STREAMS"), b"" unless bs == "keyword"
    fk       "range" | "keynum" | "unknown"        find_keys type
    fk1..3   range:  lastkey, keystep, limit
             keynum: keynumidx, firstkey, keystep  (both relative to the
                     begin_search position)
             unknown: 0, 0, 0
    flags    frozenset of lower-case key-spec flags ("ro", "access", "ow", ...)
    not_key  "not_key" in flags (e.g. the shard channel of SPUBLISH)

Specs with an ``unknown`` begin_search or find_keys are skipped, except for the
commands Redis itself resolves with custom code that the specs cannot express:
``SORT ... STORE dst`` and ``MIGRATE ... "" ... KEYS k1 k2``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

__all__ = [
    "CommandInfo",
    "KeySpec",
    "UNKNOWN",
    "TABLE_HEADER",
    "lookup",
    "command_name",
    "key_indices",
    "first_key",
    "all_commands",
]

UNKNOWN: str = "unknown"


class KeySpec(NamedTuple):
    bs: str
    bs_arg: int
    keyword: bytes
    fk: str
    fk1: int
    fk2: int
    fk3: int
    flags: frozenset
    not_key: bool


@dataclass(frozen=True, slots=True)
class CommandInfo:
    name: str  # commandstats name, e.g. "get", "client|setname"
    arity: int  # Redis arity (negative means "at least -arity")
    flags: frozenset[str]  # lowercase flags from COMMAND INFO
    first_key: int
    last_key: int
    step: int
    key_specs: tuple  # tuple[KeySpec, ...], see module docstring
    group: str  # from COMMAND DOCS, "" if unknown
    summary: str
    blocking: bool  # "blocking" in flags
    pubsub: bool  # "pubsub" in flags
    write: bool  # "write" in flags
    # bytes (lower- and upper-case spellings of the subcommand word, e.g. b"setname"
    # and b"SETNAME") -> CommandInfo; empty if not a container.  Excluded from
    # eq/hash/repr so infos stay hashable and cheap to compare.
    subcommands: dict = field(default_factory=dict, compare=False, repr=False)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
def _load_json() -> dict:
    text = resources.files(__package__ or "proxy").joinpath("command_table.json").read_text(
        encoding="utf-8"
    )
    return json.loads(text)


def _key_spec(raw: dict) -> KeySpec:
    bs = raw.get("bs") or ["unknown"]
    fk = raw.get("fk") or ["unknown"]
    flags = frozenset(raw.get("flags") or ())
    bs_type = bs[0]
    if bs_type == "index":
        bs_arg, keyword = int(bs[1]), b""
    elif bs_type == "keyword":
        bs_arg, keyword = int(bs[2]), str(bs[1]).upper().encode()
    else:
        bs_type, bs_arg, keyword = "unknown", 0, b""
    fk_type = fk[0]
    if fk_type in ("range", "keynum"):
        fk1, fk2, fk3 = int(fk[1]), int(fk[2]), int(fk[3])
    else:
        fk_type, fk1, fk2, fk3 = "unknown", 0, 0, 0
    return KeySpec(bs_type, bs_arg, keyword, fk_type, fk1, fk2, fk3, flags, "not_key" in flags)


def _info(raw: dict) -> CommandInfo:
    flags = frozenset(raw.get("flags") or ())
    return CommandInfo(
        name=raw["name"],
        arity=int(raw["arity"]),
        flags=flags,
        first_key=int(raw["first_key"]),
        last_key=int(raw["last_key"]),
        step=int(raw["step"]),
        key_specs=tuple(_key_spec(s) for s in raw.get("key_specs") or ()),
        group=raw.get("group") or "",
        summary=raw.get("summary") or "",
        blocking="blocking" in flags,
        pubsub="pubsub" in flags,
        write="write" in flags,
    )


def _build(data: dict) -> tuple[dict, dict]:
    by_name: dict[str, CommandInfo] = {}
    for name, raw in data["commands"].items():
        by_name[name] = _info(raw)
    top: dict[bytes, CommandInfo] = {}
    for name, info in by_name.items():
        container, sep, sub = name.partition("|")
        if sep:
            parent = by_name.get(container)
            if parent is None:  # malformed table; keep the rest usable
                continue
            table = parent.subcommands
            word = sub
        else:
            table = top
            word = name
        raw = word.encode()
        table[raw.lower()] = info
        table[raw.upper()] = info
    return by_name, top


_DATA = _load_json()
TABLE_HEADER: dict = dict(_DATA.get("header") or {})
_BY_NAME, _TOP = _build(_DATA)
del _DATA


# --------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------
def lookup(args: list[bytes]) -> CommandInfo | None:
    """Resolve a command (and subcommand of a container) as Redis counts it."""
    if not args:
        return None
    name = args[0]
    info = _TOP.get(name)
    if info is None:
        info = _TOP.get(name.lower())
        if info is None:
            return None
    subs = info.subcommands
    if subs and len(args) > 1:
        word = args[1]
        sub = subs.get(word)
        if sub is None:
            sub = subs.get(word.lower())
        return sub
    return info


def command_name(args: list[bytes]) -> str:
    info = lookup(args)
    return UNKNOWN if info is None else info.name


def all_commands() -> dict[str, CommandInfo]:
    """Every command and subcommand, by commandstats name (a fresh dict)."""
    return dict(_BY_NAME)


# --------------------------------------------------------------------------
# Key extraction
# --------------------------------------------------------------------------
def _count(raw) -> int:
    """Non-negative decimal integer in Redis syntax, else -1 (no exceptions)."""
    try:
        if raw.isdigit() and (raw[0] != 0x30 or len(raw) == 1):
            if len(raw) > 18:  # beyond any real argument count
                return 1 << 62
            return int(raw)
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    return -1


def _sort_keys(args: list, out: list, first_only: bool) -> None:
    # SORT key [BY pattern] [LIMIT offset count] [GET pattern ...] [ASC|DESC]
    #      [ALPHA] [STORE destination]: the key, then the (last) STORE target.
    argc = len(args)
    if argc > 1:
        out.append(1)
        if first_only:
            return
    store = -1
    i = 2
    while i < argc:
        word = args[i].lower()
        if word == b"limit":
            i += 2
        elif word == b"get" or word == b"by":
            i += 1
        elif word == b"store":
            if i + 1 < argc:
                store = i + 1
            i += 1
        i += 1
    if store > 0:
        out.append(store)


def _migrate_keys(args: list, out: list, first_only: bool) -> None:
    # MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH ...] [KEYS k ...]
    argc = len(args)
    if argc <= 3:
        return
    if args[3]:
        out.append(3)
        return
    for i in range(6, argc):
        word = args[i]
        if word == b"KEYS" or word == b"keys" or (len(word) == 4 and word.upper() == b"KEYS"):
            out.extend(range(i + 1, argc))
            return


_SPECIAL = {"sort": _sort_keys, "migrate": _migrate_keys}

# Per-command key-extraction plans, computed once at import and keyed by name:
#   (info, kind, data) with kind
#     _NONE    no keys at all
#     _SINGLE  exactly one key, at index ``data`` (GET, SET, HSET, ...)
#     _SPECIAL custom function ``data`` (SORT, MIGRATE)
#     _SPECS   general: ``data`` is the tuple of key specs
#     _LEGACY  no key specs: ``data`` is (first_key, last_key, step)
# ``info`` is kept so that a CommandInfo built by a caller under a known name
# is not confused with the table's own.
_NONE, _SINGLE, _SPECIALK, _SPECS, _LEGACY = range(5)


def _plan(info: CommandInfo) -> tuple:
    special = _SPECIAL.get(info.name)
    if special is not None:
        return (info, _SPECIALK, special)
    specs = info.key_specs
    if not specs:
        if info.first_key > 0:
            return (info, _LEGACY, (info.first_key, info.last_key, info.step))
        return (info, _NONE, None)
    if len(specs) == 1:
        s = specs[0]
        if s.bs == "index" and s.fk == "range" and s.fk1 == 0 and not s.not_key and s.bs_arg > 0:
            return (info, _SINGLE, s.bs_arg)
    return (info, _SPECS, tuple(tuple(s) for s in specs))


_PLANS: dict[str, tuple] = {name: _plan(info) for name, info in _BY_NAME.items()}


def _collect(info: CommandInfo, args: list, first_only: bool, include_not_keys: bool) -> list[int]:
    plan = _PLANS.get(info.name)
    if plan is None or plan[0] is not info:
        plan = _plan(info)
    kind = plan[1]
    if kind == _SINGLE:
        i = plan[2]
        return [i] if i < len(args) else []
    if kind == _NONE:
        return []
    out: list[int] = []
    argc = len(args)
    if kind == _SPECIALK:
        plan[2](args, out, first_only)
        return out
    if kind == _LEGACY:
        first, last, step = plan[2]
        if last < 0:
            last = argc + last
        if step < 1:
            step = 1
        if last >= argc:
            last = argc - 1
        if first <= last:
            if first_only:
                out.append(first)
            else:
                out.extend(range(first, last + 1, step))
        return out
    for bs, bs_arg, kw, fk, fk1, fk2, fk3, _flags, not_key in plan[2]:
        if not_key and not include_not_keys:
            continue
        if bs == "index":
            first = bs_arg
        elif bs == "keyword":
            kwlen = len(kw)
            first = 0
            if bs_arg > 0:
                rng = range(bs_arg, argc - 1)
            else:
                rng = range(argc + bs_arg, 0, -1)
            for i in rng:
                if i >= argc or i < 1:
                    break
                word = args[i]
                if word == kw or (len(word) == kwlen and word.upper() == kw):
                    first = i + 1
                    break
            if not first:
                continue
        else:
            continue
        if first < 1 or first >= argc:
            continue
        if fk == "range":
            # fk1 = lastkey, fk2 = keystep, fk3 = limit
            step = fk2
            if fk1 >= 0:
                last = first + fk1
            elif fk3 <= 1:
                last = argc + fk1
            else:
                last = first + ((argc - first) // fk3 + fk1)
        elif fk == "keynum":
            # fk1 = keynumidx, fk2 = firstkey, fk3 = keystep
            idx = first + fk1
            if idx < 1 or idx >= argc:
                continue
            numkeys = _count(args[idx])
            if numkeys < 0:
                continue
            step = fk3 if fk3 > 0 else 1
            first += fk2
            if numkeys > argc:
                numkeys = argc
            last = first + numkeys * step - 1
        else:
            continue
        if step < 1:
            step = 1
        if last >= argc:
            last = argc - 1
        if first > last or first < 1:
            continue
        if first_only:
            out.append(first)
            return out
        if first == last:
            out.append(first)
        else:
            out.extend(range(first, last + 1, step))
    return out


def key_indices(info: CommandInfo, args: list[bytes], *, include_not_keys: bool = False) -> list[int]:
    """Indices into ``args`` of the command's keys, in key-spec order.

    Never raises on malformed input (bad numkeys, too few arguments): specs that
    cannot be resolved contribute nothing. Specs flagged ``not_key`` (the shard
    channel of SPUBLISH/SSUBSCRIBE/SUNSUBSCRIBE) are skipped unless
    ``include_not_keys`` is true.
    """
    return _collect(info, args, False, include_not_keys)


def first_key(args: list[bytes]) -> bytes | None:
    """The first key of the command in ``args``, or None (unknown command / no key)."""
    info = lookup(args)
    if info is None:
        return None
    idx = _collect(info, args, True, False)
    return args[idx[0]] if idx else None
