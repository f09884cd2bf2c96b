"""The command policy (``[commands] deny``, ``--deny-commands``): commands a proxy user must never send
to a server that is shared or whose credentials the proxy holds.

First the policy object and its session playbooks (no sockets), then a real password-protected
redis-server behind a real proxy: what is denied never reaches the server (its INFO commandstats is
the witness), the client gets ``-NOPERM``, a transaction holding a denied command is aborted whole,
and the metrics count the refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from proxy import cli
from proxy.commandpolicy import DEFAULT, CommandPolicy, CommandPolicyError, entry_problems, split_spec
from proxy.configfile import load_config
from proxy.gate import Gate
from proxy.metrics import Stats
from proxy.options import RUN_OPTIONS
from proxy.resp import encode_command
from proxy.session import Session

import support
from support import RespError, RespSocket, commandstats, commandstats_delta, encode_resp

SECRET = "Upstr3am-Pa55word"


def noperm(name: str) -> str:
    return f"NOPERM respmeter: {name} is disabled by the proxy (commands.deny)"


EXECABORT = "EXECABORT Transaction discarded because of previous errors."


def _session_applies_policy() -> bool:
    """Whether Session keeps the policy's denied names off its fast path and out of MONITOR mode
    (it takes ``policy.slow_names``); until it does, the gate keeps every batch on the slow path."""
    gate = Gate(commands=CommandPolicy())
    s = Session(Stats(), lambda b: None, lambda: None, policy=gate)
    return getattr(s, "slow_names", None) is gate.slow_names


SESSION_APPLIES_POLICY = _session_applies_policy()


# -- the policy object ---------------------------------------------------------------------------


def test_default_list_denies_credentials_and_takeover_but_not_ordinary_work() -> None:
    p = CommandPolicy()
    assert p.denied("config|get") == b"-NOPERM respmeter: config|get is disabled by the proxy (commands.deny)\r\n"
    for name in ("config", "config|get", "config|set", "config|rewrite", "acl", "acl|list", "acl|getuser",
                 "acl|setuser", "acl|log", "module|load", "module|list", "debug", "shutdown", "save",
                 "replicaof", "slaveof", "failover", "sync", "psync", "replconf", "cluster|reset",
                 "cluster|info", "client|kill", "client|pause", "script|debug"):
        assert p.denied(name) is not None, name
    for name in ("acl|whoami", "get", "set", "eval", "monitor", "flushall", "flushdb", "keys", "bgsave",
                 "bgrewriteaof", "info", "client|list", "client|setname", "client|setinfo", "client|unpause",
                 "script|kill", "function|kill", "latency|doctor", "slowlog|get", "hello", "auth", "multi",
                 "exec", "select", "ping"):
        assert p.denied(name) is None, name


def test_a_container_covers_subcommands_the_table_does_not_know() -> None:
    p = CommandPolicy()
    assert p.check([b"CONFIG", b"NEWSUB"], "unknown") == p.denied("config")
    assert p.check([b"Acl", b"future"], "unknown") == p.denied("acl")
    assert p.check([b"CLIENT", b"NOSUCHSUB"], "unknown") is None  # client is only partly denied
    assert p.check([b"FOOBAR"], "unknown") is None
    assert "unknown" in p.slow_names
    assert "unknown" not in CommandPolicy(["client|kill"]).slow_names


def test_entries_exceptions_and_the_default_group() -> None:
    assert not CommandPolicy([]) and not CommandPolicy.from_spec("") and not CommandPolicy.from_spec(" , ")
    p = CommandPolicy.from_spec("@default, FLUSHALL ,!client|kill")
    assert p.denied("flushall") and p.denied("config|get") and p.denied("client|kill") is None
    # exceptions win whatever their place
    assert CommandPolicy(["!acl|whoami", "acl"]).denied("acl|whoami") is None
    assert CommandPolicy(["acl", "!acl"]).denied("acl|list") is None
    assert CommandPolicy(["acl", "!acl"]).check([b"ACL", b"X"], "unknown") is None
    assert CommandPolicy(["@default", "!acl|whoami"]).denied("acl|whoami") is None  # said twice: fine
    only = CommandPolicy(["shutdown"])
    assert only.denied("shutdown") and only.denied("config|get") is None
    assert only.slow_names == {"shutdown"}
    assert CommandPolicy(DEFAULT).denied_names == CommandPolicy(["@default"]).denied_names


def test_invalid_entries_are_named_with_their_place() -> None:
    assert split_spec("a, b,,c ") == ["a", "b", "c"]
    problems = entry_problems(["config", "confgi", "config get", "@admin", "!@default", "!monitor", ""])
    assert problems == [
        (1, "'confgi': unknown command"),
        (2, "'config get': unknown command (name subcommands as config|get)"),
        (3, "'@admin': unknown group (the only one is @default)"),
        (4, "'!@default': @default cannot be an exception"),
        (5, "'!monitor' re-allows nothing: no other entry denies monitor"),
        (6, "empty entry"),
    ]
    with pytest.raises(CommandPolicyError) as exc:
        CommandPolicy(["nosuch"])
    assert exc.value.problems == [(0, "'nosuch': unknown command")]


def test_option_flag_environment_and_file_share_one_name(tmp_path: Path) -> None:
    option = {o.dest: o for o in RUN_OPTIONS}["deny_commands"]
    assert (option.flag, option.env) == ("--deny-commands", "RESPMETER_DENY_COMMANDS")
    parser = cli.build_parser()

    def resolved(argv: list[str], env: dict[str, str], file_values: dict | None = None) -> str:
        ns = parser.parse_args(["run", *argv])
        return cli.resolve(RUN_OPTIONS, ns, env, parser, file_values)["deny_commands"]

    assert resolved([], {}) == "@default"
    assert resolved(["--deny-commands", ""], {"RESPMETER_DENY_COMMANDS": "flushall"}) == ""
    assert resolved([], {"RESPMETER_DENY_COMMANDS": "flushall"}, {"deny_commands": "keys"}) == "flushall"
    assert resolved([], {"RESPMETER_DENY_COMMANDS": ""}) == ""
    f = tmp_path / "r.toml"
    f.write_text('[commands]\ndeny = ["@default", "flushall"]\n')
    cfg = load_config(str(f))
    assert cfg.problems == []
    assert resolved([], {}, cfg.values) == "@default,flushall"
    f.write_text('[commands]\ndeny = []\n')
    assert resolved([], {}, load_config(str(f)).values) == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--deny-commands", "config,nosuch"])


def test_config_file_problems_have_their_line(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text(textwrap.dedent("""\
        [proxy]
        deny_commands = "config"

        [commands]
        deny = [
          "@default",   # "a quoted comment"
          "confgi",
        ]
        allow = ["acl|whoami"]
        """))
    problems = load_config(str(f)).problems
    assert f"{f}:2: proxy.deny_commands: unknown option (caps, rate limits, the command policy and savers " \
           "have their own sections)" in problems
    assert f"{f}:7: commands.deny[1]: 'confgi': unknown command" in problems
    assert f"{f}:9: commands.allow: unknown key (expected one of: deny)" in problems
    f.write_text('[commands]\ndeny = "config"\n')
    assert load_config(str(f)).problems == [
        f'{f}:2: commands.deny: must be a list of command names (e.g. ["@default", "flushall"])']


# -- playbooks: a Session with the gate, no sockets --------------------------------------------------


class Play:
    def __init__(self, policy: CommandPolicy | None = None) -> None:
        self.stats = Stats()
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.closed = False
        self.gate = Gate(commands=CommandPolicy() if policy is None else policy)
        self.s = Session(self.stats, self.to_client.append, self._close, clock=lambda: 0.0, policy=self.gate)
        self.s.upstream_connected(self.to_upstream.append, self._close)

    def _close(self) -> None:
        self.closed = True

    def send(self, *cmds: list[bytes]) -> bytes:
        self.to_upstream.clear()
        self.s.client_data(b"".join(encode_command(c) for c in cmds))
        return b"".join(self.to_upstream)

    def reply(self, data: bytes) -> bytes:
        self.to_client.clear()
        self.s.upstream_data(data)
        return b"".join(self.to_client)


def rejections(p: Play) -> dict[str, int]:
    return {k: v for k, v in p.stats.rejections.items() if v}


def enc(*cmds: list[bytes]) -> bytes:
    return b"".join(encode_command(c) for c in cmds)


def err(text: str) -> bytes:
    return b"-" + text.encode() + b"\r\n"


def test_pipeline_with_denied_commands_forwards_only_the_rest(hot_path: str) -> None:
    p = Play()
    cmds = [[b"SET", b"a", b"1"], [b"CONFIG", b"GET", b"requirepass"], [b"GET", b"a"], [b"SHUTDOWN", b"NOSAVE"],
            [b"sync"], [b"GET", b"b"], [b"config", b"newsub"], [b"ACL", b"WHOAMI"], [b"DEBUG", b"SLEEP", b"0"]]
    up = p.send(*cmds)
    assert up == enc([b"SET", b"a", b"1"], [b"GET", b"a"], [b"GET", b"b"], [b"ACL", b"WHOAMI"])
    assert p.to_client == []  # the refusals wait for the replies before them
    out = p.reply(b"+OK\r\n$1\r\n1\r\n$-1\r\n$7\r\ndefault\r\n")
    assert out == (b"+OK\r\n" + err(noperm("config|get")) + b"$1\r\n1\r\n" + err(noperm("shutdown"))
                   + err(noperm("sync")) + b"$-1\r\n" + err(noperm("config")) + b"$7\r\ndefault\r\n"
                   + err(noperm("debug")))
    assert p.stats.upstream_by_command() == {"set": 1, "get": 2, "acl|whoami": 1}
    rejected = {k[1]: v for k, v in p.stats.commands.items() if k[2] == "rejected"}
    assert rejected == {"config|get": 1, "shutdown": 1, "sync": 1, "unknown": 1, "debug": 1}
    assert rejections(p) == {"denied": 5}


def test_inline_and_any_case(hot_path: str) -> None:
    p = Play()
    p.s.client_data(b"config get requirepass\r\nGET a\r\nShutDown nosave\r\n")
    assert b"".join(p.to_upstream) == b"GET a\r\n"
    assert p.to_client == [err(noperm("config|get"))]  # nothing before it to wait for
    assert p.reply(b"$-1\r\n") == b"$-1\r\n" + err(noperm("shutdown"))


def test_runs_of_denied_commands_never_take_the_fast_path(hot_path: str) -> None:
    """Long pipelines, the shape the C framer hands over as runs: not one denied command reaches the
    upstream, however it is mixed with plain ones."""
    p = Play()
    cmds = []
    for i in range(50):
        cmds += [[b"GET", b"k%d" % i]] * 3 + [[b"SAVE"], [b"SHUTDOWN"], [b"PSYNC", b"?", b"-1"], [b"INCR", b"n"]]
    up = p.send(*cmds)
    assert up == enc(*[c for c in cmds if c[0] in (b"GET", b"INCR")])
    assert rejections(p) == {"denied": 150}


def test_nothing_denied_keeps_the_fast_path() -> None:
    p = Play(CommandPolicy([]))
    # (only what the proxy never forwards as sent, whatever the policy: proxy.handshake.REWRITTEN_NAMES)
    assert p.gate.commands is None and p.gate.slow_names == frozenset({"client|maint_notifications"})
    assert p.gate.fast_admit(p.s, 1)
    assert p.send([b"CONFIG", b"GET", b"x"]) == enc([b"CONFIG", b"GET", b"x"])


@pytest.mark.skipif(not SESSION_APPLIES_POLICY, reason="Session does not take policy.slow_names yet")
def test_with_denied_names_the_fast_path_still_serves_plain_batches() -> None:
    p = Play()
    assert p.s.slow_names is p.gate.slow_names
    assert p.gate.fast_admit(p.s, 16)


def test_denied_inside_multi_aborts_the_transaction(hot_path: str) -> None:
    p = Play()
    up = p.send([b"MULTI"], [b"SET", b"k", b"1"], [b"CONFIG", b"GET", b"requirepass"], [b"INCR", b"n"], [b"EXEC"])
    # the EXEC becomes a DISCARD (the proxy's own command): the server runs nothing of it
    assert up == enc([b"MULTI"], [b"SET", b"k", b"1"], [b"INCR", b"n"], [b"DISCARD"])
    out = p.reply(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n")
    assert out == b"+OK\r\n+QUEUED\r\n" + err(noperm("config|get")) + b"+QUEUED\r\n" + err(EXECABORT)
    assert p.stats.upstream_by_command() == {"multi": 1, "discard": 1}  # SET and INCR never ran
    assert p.stats.upstream[("respmeter", "discard")] == 1
    assert p.stats.commands[("anonymous", "exec", "rejected")] == 1
    assert rejections(p) == {"denied": 2}
    assert not p.s.in_multi and not p.s.multi_view
    # the next transaction is a normal one
    assert p.send([b"MULTI"], [b"GET", b"k"], [b"EXEC"]) == enc([b"MULTI"], [b"GET", b"k"], [b"EXEC"])


def test_the_discard_in_place_of_exec_uses_the_budget_multi_kept(tmp_path: Path) -> None:
    """Under a cap, MULTI keeps one command of budget for its EXEC; when the EXEC becomes a DISCARD,
    the DISCARD spends it: a transaction that just fits the cap still ends cleanly, and the budget
    spent is exactly what went upstream."""
    from proxy.limits import CapConfig, Limits
    from proxy.store import Store

    stats = Stats()
    limits = Limits(CapConfig(daily=3), [], Store(tmp_path), stats=stats)
    gate = Gate(limits=limits, commands=CommandPolicy())
    to_upstream: list[bytes] = []
    to_client: list[bytes] = []
    s = Session(stats, to_client.append, lambda: None, policy=gate)
    s.upstream_connected(to_upstream.append, lambda: None)
    s.client_data(enc([b"MULTI"], [b"SET", b"k", b"1"], [b"CONFIG", b"GET", b"x"], [b"EXEC"]))
    assert b"".join(to_upstream) == enc([b"MULTI"], [b"SET", b"k", b"1"], [b"DISCARD"])
    s.upstream_data(b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert b"".join(to_client) == b"+OK\r\n+QUEUED\r\n" + err(noperm("config|get")) + err(EXECABORT)
    assert s.tx_spare == 0
    assert limits.used("daily") == 3  # MULTI, SET, DISCARD
    limits.close()


def test_discard_or_reset_ends_a_doomed_transaction(hot_path: str) -> None:
    for end in (b"DISCARD", b"RESET"):
        p = Play()
        up = p.send([b"MULTI"], [b"ACL", b"LIST"], [end], [b"MULTI"], [b"GET", b"k"], [b"EXEC"])
        assert up == enc([b"MULTI"], [end], [b"MULTI"], [b"GET", b"k"], [b"EXEC"]), end


def test_not_queued_commands_do_not_doom_the_transaction(hot_path: str) -> None:
    p = Play(CommandPolicy(["watch", "config"]))
    up = p.send([b"MULTI"], [b"WATCH", b"k"], [b"GET", b"k"], [b"EXEC"])
    assert up == enc([b"MULTI"], [b"GET", b"k"], [b"EXEC"])


@pytest.mark.skipif(not SESSION_APPLIES_POLICY, reason="Session does not apply the policy in MONITOR mode yet")
def test_a_denied_command_in_monitor_mode_closes_the_connection() -> None:
    p = Play()
    p.send([b"MONITOR"])
    p.reply(b"+OK\r\n")
    assert p.s.monitor
    up = p.send([b"PING"], [b"CONFIG", b"GET", b"requirepass"], [b"PING"])
    assert up == enc([b"PING"])
    assert p.closed
    assert rejections(p) == {"denied": 1}


# -- end to end: a password-protected redis-server behind the proxy ------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """A redis-server with requirepass, and a proxy with the default policy that holds its password."""
    server = support.RedisServer(password=SECRET, workdir=tmp_path_factory.mktemp("redis")).start()
    work = tmp_path_factory.mktemp("proxy")
    proxy = support.ProxyProcess(server.url_with_auth("default", SECRET), workdir=work).start()
    try:
        yield server, proxy
    finally:
        proxy.terminate()
        server.stop()


def _stats(server) -> dict[str, int]:  # noqa: ANN001
    """INFO commandstats, but for what connecting costs (the proxy's AUTH, redis-py's handshake)."""
    return {k: v for k, v in commandstats(server.client()).items() if k not in HANDSHAKE}


HANDSHAKE = {"auth", "hello", "client|setinfo", "client"}


def test_config_get_requirepass_is_denied_and_never_reaches_the_server(guarded) -> None:  # noqa: ANN001
    server, proxy = guarded
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("CONFIG", "GET", "requirepass") == RespError(noperm("config|get"))
        assert s.call("config", "set", "requirepass", "") == RespError(noperm("config|set"))
        assert s.call("Config", "Rewrite") == RespError(noperm("config|rewrite"))
        assert s.call("CONFIG", "NEWSUB") == RespError(noperm("config"))
        # pipelined in one write, between ordinary commands
        s.send(encode_resp("SET", "cp:a", "1") + encode_resp("CONFIG", "GET", "*") + encode_resp("GET", "cp:a"))
        assert [s.read(), s.read(), s.read()] == [b"OK", RespError(noperm("config|get")), b"1"]
    r = proxy.client()
    with pytest.raises(redis.exceptions.NoPermissionError, match="config.get is disabled by the proxy"):
        r.config_get("requirepass")
    delta = commandstats_delta(before, _stats(server))
    assert not {k for k in delta if k.startswith("config")}, delta
    assert delta.get("set") == 1 and delta.get("get") == 1


def test_acl_list_is_denied_but_acl_whoami_works(guarded) -> None:  # noqa: ANN001
    server, proxy = guarded
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("ACL", "LIST") == RespError(noperm("acl|list"))
        assert s.call("ACL", "GETUSER", "default") == RespError(noperm("acl|getuser"))
        assert s.call("ACL", "SETUSER", "mallory", "on", ">pw", "+@all") == RespError(noperm("acl|setuser"))
        assert s.call("ACL", "WHOAMI") == b"default"
    assert proxy.client().acl_whoami() in ("default", b"default")
    delta = commandstats_delta(before, _stats(server))
    assert {k: v for k, v in delta.items() if k.startswith("acl")} == {"acl|whoami": 2}
    assert "mallory" not in server.client().acl_users()


def test_shutdown_and_takeover_commands_are_denied_and_the_server_keeps_running(guarded) -> None:  # noqa: ANN001
    server, proxy = guarded
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("SHUTDOWN", "NOSAVE") == RespError(noperm("shutdown"))
        assert s.call("DEBUG", "SLEEP", "0") == RespError(noperm("debug"))
        assert s.call("REPLICAOF", "127.0.0.1", "1") == RespError(noperm("replicaof"))
        assert s.call("MODULE", "LOAD", "/tmp/x.so") == RespError(noperm("module|load"))
        assert s.call("SYNC") == RespError(noperm("sync"))
        assert s.call("CLIENT", "PAUSE", "100000") == RespError(noperm("client|pause"))
        assert s.call("PING") == b"PONG"  # the connection is still fine
    delta = commandstats_delta(before, _stats(server))
    assert set(delta) == {"ping"}, delta
    assert server.is_running()
    direct = server.client()
    assert direct.ping()
    assert direct.info("replication")["role"] == "master"


def test_a_denied_command_inside_multi_aborts_the_transaction(guarded) -> None:  # noqa: ANN001
    server, proxy = guarded
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("MULTI") == b"OK"
        assert s.call("SET", "tx:k", "1") == b"QUEUED"
        assert s.call("CONFIG", "GET", "requirepass") == RespError(noperm("config|get"))
        assert s.call("INCR", "tx:n") == b"QUEUED"
        assert s.call("EXEC") == RespError(EXECABORT)
        assert s.call("PING") == b"PONG"  # not in MULTI any more
        # the same in one write
        s.send(encode_resp("MULTI") + encode_resp("SET", "tx:k", "2") + encode_resp("SHUTDOWN")
               + encode_resp("EXEC"))
        assert [s.read() for _ in range(4)] == [b"OK", b"QUEUED", RespError(noperm("shutdown")), RespError(EXECABORT)]
    # redis-py's transaction pipeline raises what it raises when Redis refuses a queued command (ACL):
    # the command's own error, having read the EXECABORT
    pipe = proxy.client().pipeline(transaction=True)
    pipe.set("tx:k", "3").config_get("requirepass").incr("tx:n")
    with pytest.raises(redis.exceptions.NoPermissionError, match=r"Command # 2 \(CONFIG GET requirepass\)"):
        pipe.execute()
    delta = commandstats_delta(before, _stats(server))
    assert delta == {"multi": 3, "discard": 3, "ping": 1}, delta  # neither EXEC nor SET nor INCR ran
    direct = server.client()
    assert direct.get("tx:k") is None and direct.get("tx:n") is None


def test_metrics_count_denied_commands_as_rejected(guarded, proxy_factory) -> None:  # noqa: ANN001
    server, _ = guarded
    proxy = proxy_factory(server.url_with_auth("default", SECRET))
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("CONFIG", "GET", "requirepass") == RespError(noperm("config|get"))
        assert s.call("CONFIG", "GET", "masterauth") == RespError(noperm("config|get"))
        assert s.call("ACL", "LIST") == RespError(noperm("acl|list"))
        assert s.call("MULTI") == b"OK"
        assert s.call("SAVE") == RespError(noperm("save"))
        assert s.call("EXEC") == RespError(EXECABORT)
    commands = proxy.metric_sum("respmeter_commands_total", by=("command", "outcome"))
    assert commands[("config|get", "rejected")] == 2
    assert commands[("acl|list", "rejected")] == 1
    assert commands[("save", "rejected")] == 1
    assert commands[("exec", "rejected")] == 1
    assert proxy.metric_sum("respmeter_rejections_total", by=("reason",))["denied"] == 5
    upstream = proxy.metric_sum("respmeter_upstream_commands_total", by=("command",))
    assert not {k for k, v in upstream.items() if v and k in ("config|get", "acl|list", "save", "exec")}


def test_empty_deny_list_forwards_everything(guarded, proxy_factory) -> None:  # noqa: ANN001
    server, _ = guarded
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--deny-commands", ""])
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("CONFIG", "GET", "requirepass") == [b"requirepass", SECRET.encode()]
        assert isinstance(s.call("ACL", "LIST"), list)
    delta = commandstats_delta(before, _stats(server))
    assert delta.get("config|get") == 1 and delta.get("acl|list") == 1
    assert not any(proxy.metric_sum("respmeter_rejections_total", by=("reason",)).values())


def test_environment_variable_replaces_the_default(guarded, proxy_factory) -> None:  # noqa: ANN001
    server, _ = guarded
    proxy = proxy_factory(server.url_with_auth("default", SECRET), env={"RESPMETER_DENY_COMMANDS": "flushall,keys"})
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("FLUSHALL") == RespError(noperm("flushall"))
        assert s.call("KEYS", "*") == RespError(noperm("keys"))
        assert s.call("CONFIG", "GET", "maxclients")[0] == b"maxclients"


def test_config_file_commands_deny(guarded, proxy_factory, tmp_path: Path) -> None:  # noqa: ANN001
    server, _ = guarded
    conf = tmp_path / "respmeter.toml"
    conf.write_text(textwrap.dedent(f"""\
        [proxy]
        state_dir = "{tmp_path / 'state'}"

        [commands]
        deny = ["@default", "flushall", "!client|kill"]
        """))
    proxy = proxy_factory(server.url_with_auth("default", SECRET), ["--config", str(conf)])
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("FLUSHALL") == RespError(noperm("flushall"))
        assert s.call("CONFIG", "GET", "requirepass") == RespError(noperm("config|get"))
        assert s.call("CLIENT", "KILL", "ID", "999999999") == 0  # re-allowed: the server answers
    assert "command policy (--deny-commands): denied: acl (but acl|whoami)" in proxy.log_text()


def test_check_config_and_run_report_a_bad_name_with_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "respmeter.toml"
    conf.write_text('[commands]\ndeny = [\n  "config",\n  "confgi",\n]\n')
    cmd = [sys.executable, "-m", "proxy"]
    out = subprocess.run([*cmd, "check-config", str(conf)], capture_output=True, text=True, timeout=60,
                         cwd=support.REPO_ROOT)
    assert out.returncode == 1
    assert f"{conf}:4: commands.deny[1]: 'confgi': unknown command" in out.stdout
    run = subprocess.run([*cmd, "run", "--config", str(conf), "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60, cwd=support.REPO_ROOT)
    assert run.returncode == 2 and "commands.deny[1]: 'confgi': unknown command" in run.stderr
    flag = subprocess.run([*cmd, "run", "--deny-commands", "config,acl|lsit", "--state-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=60, cwd=support.REPO_ROOT)
    assert flag.returncode == 2 and "argument --deny-commands: 'acl|lsit': unknown command" in flag.stderr


@pytest.mark.skipif(not SESSION_APPLIES_POLICY, reason="Session does not apply the policy in MONITOR mode yet")
def test_monitor_is_allowed_but_cannot_carry_a_denied_command(guarded) -> None:  # noqa: ANN001
    server, proxy = guarded
    before = _stats(server)
    with RespSocket(proxy.host, proxy.port) as s:
        assert s.call("MONITOR") == b"OK"
        # on Redis a MONITOR connection still runs commands: the proxy must not let one through
        s.command("CONFIG", "GET", "requirepass")
        assert s.closed_by_peer()
    delta = commandstats_delta(before, _stats(server))
    assert "config|get" not in delta and delta.get("monitor") == 1


def test_a_denied_command_under_client_reply_off_gets_no_reply(hot_path: str) -> None:
    """CLIENT REPLY OFF: Redis sends no reply at all, errors included; the proxy's refusal is no
    exception (a client that turned replies off reads none, and an unexpected one would be taken
    for the reply to a later command). Counted all the same."""
    p = Play()
    up = p.send([b"CLIENT", b"REPLY", b"OFF"], [b"CONFIG", b"GET", b"requirepass"], [b"SET", b"a", b"1"],
                [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"a"])
    assert up == enc([b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"a", b"1"], [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"a"])
    assert b"".join(p.to_client) == b""  # (not the refusal, even before the server's replies come)
    assert p.reply(b"+OK\r\n$1\r\n1\r\n") == b"+OK\r\n$1\r\n1\r\n"  # only ON's and GET's replies
    assert rejections(p) == {"denied": 1}


def test_a_denied_command_queued_after_client_reply_off_in_multi_is_answered(hot_path: str) -> None:
    """Inside MULTI, CLIENT REPLY OFF is only queued (it acts when EXEC runs it): a command denied
    after it is still answered, as every queued command is."""
    p = Play()
    up = p.send([b"MULTI"], [b"CLIENT", b"REPLY", b"OFF"], [b"CONFIG", b"GET", b"x"])
    assert up == enc([b"MULTI"], [b"CLIENT", b"REPLY", b"OFF"])
    got = p.reply(b"+OK\r\n+QUEUED\r\n")
    assert got.startswith(b"+OK\r\n+QUEUED\r\n-NOPERM") and b"disabled by the proxy" in got, got
