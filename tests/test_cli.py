"""The command line as users meet it: unix sockets, the stdlib loop, bad settings, hash-password."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import support
from proxy.auth import verify_hash
from proxy.config import ConfigError, mask_url, parse_listen, parse_upstream

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        input=stdin, timeout=timeout,
    )


def test_unix_sockets_both_sides_and_the_stdlib_loop(redis_factory, proxy_factory, tmp_path: Path) -> None:
    server = redis_factory(["--unixsocket", str(tmp_path / "redis.sock"), "--unixsocketperm", "700"])
    listen = tmp_path / "proxy.sock"
    proxy = proxy_factory(f"unix://{tmp_path / 'redis.sock'}", ["--listen", str(listen), "--listen", "127.0.0.1:" + str(support.free_port()), "--loop", "asyncio"])
    r = redis.Redis(unix_socket_path=str(listen), protocol=3)
    assert r.set("via-unix", "yes") is True
    assert server.client().get("via-unix") == b"yes"
    assert "loop: asyncio" in proxy.log_text()
    assert proxy.metric_sum("respmeter_upstream_commands_total").get("set") == 1


def test_parse_listen_and_upstream() -> None:
    assert str(parse_listen("celery=127.0.0.1:6380")) == "celery=127.0.0.1:6380"
    assert parse_listen("[::1]:6380").host == "::1"
    assert parse_listen("/run/respmeter.sock").path == "/run/respmeter.sock"
    assert parse_listen("unix:/tmp/x.sock").path == "/tmp/x.sock"
    assert not parse_listen("0.0.0.0:6380").is_loopback
    assert parse_listen("localhost:6380").is_loopback
    u = parse_upstream("rediss://default:t0k%40n@example.upstash.io:6379/0")
    assert (u.tls, u.username, u.password, u.host, u.port, u.db) == (True, "default", "t0k@n", "example.upstash.io", 6379, 0)
    assert mask_url(u) == "rediss://default:****@example.upstash.io:6379"
    assert "t0k" not in repr(u)
    for bad in ("http://x", "redis://:6379", "redis://h:notaport", "redis://h:6379/x", "unix://"):
        with pytest.raises(ConfigError) as exc:
            parse_upstream(bad)
        assert "--upstream" in str(exc.value)
    for bad in ("6380", "host:", "bad name=127.0.0.1:1"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--upstream", "ftp://x"], {}, "scheme must be redis://, rediss:// or unix://"),
        # (the state store's URL is named as such, before anything starts, its password never shown)
        (["--state-url", "redis://:s3cr3t-pw@127.0.0.1:99999"], {}, "--state-url: bad port"),
        (["--state-url", "http://127.0.0.1:1"], {}, "--state-url: scheme must be redis://, rediss:// or unix:// (or"),
        (["--listen", "nohostport"], {}, "expected HOST:PORT"),
        (["--max-bulk", "lots"], {}, "not a size"),
        ([], {"RESPMETER_CONNECT_TIMEOUT": "soon"}, "RESPMETER_CONNECT_TIMEOUT"),
        ([], {"RESPMETER_ON_CAP": "panic"}, "must be one of error, idle"),
        (["--daily-cap", "-3"], {}, "must be positive"),
        (["--cap-timezone", "Mars/Olympus"], {}, "unknown timezone"),
        (["--rate-limit", "name=x,rate=fast"], {}, "--rate-limit"),
        (["--client-cap", "web=5"], {}, "IDENTITY:daily=N"),
        (["--config", "/nonexistent/respmeter.toml"], {}, "cannot read"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(args: list[str], env: dict, message: str, tmp_path: Path) -> None:
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env}
    r = run_cli("run", "--admin", f"127.0.0.1:{support.free_port()}", "--listen", f"127.0.0.1:{support.free_port()}",
                "--state-dir", str(tmp_path / "state"), *args, env=full_env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "s3cr3t-pw" not in r.stdout + r.stderr
    assert "listening" not in r.stderr  # refused before starting anything


def test_admin_port_in_use_is_a_clear_error(redis_server, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("run", "--upstream", redis_server.url, "--admin", f"127.0.0.1:{port}",
                    "--listen", f"127.0.0.1:{support.free_port()}", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert f"cannot listen for the admin endpoint on --admin 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_hash_password_from_stdin() -> None:
    r = run_cli("hash-password", "--stdin", stdin="correct horse\n")
    assert r.returncode == 0, r.stderr
    h = r.stdout.strip()
    assert h.startswith("scrypt$") and "correct horse" not in h
    assert verify_hash(b"correct horse", h)
    assert not verify_hash(b"wrong", h)
    assert run_cli("hash-password", "--stdin", stdin="\n").returncode == 1


def test_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("respmeter ")
    r = run_cli("run", "--help")
    assert r.returncode == 0
    assert "RESPMETER_UPSTREAM" in r.stdout and "--daily-cap" in r.stdout


def test_usage_and_report_say_when_the_proxy_is_not_there() -> None:
    port = support.free_port()
    for cmd in ("usage", "report"):
        r = run_cli(cmd, "--admin", f"127.0.0.1:{port}")
        assert r.returncode == 1
        assert "cannot reach the admin endpoint" in r.stderr and "Traceback" not in r.stderr
