"""First run and help (issue 11, item 14): what ``respmeter`` says before it proxies anything.

The help reads as plain text with one correct default per flag, every argument has a help text,
an unknown flag is reported by the subcommand it was given to, a listener that cannot be bound is
named with its address and the OS's reason, and the startup log says what the process will do
(upstream, state directory, caps, on_cap) without any secret in it. Real processes throughout,
like a user's first ``respmeter run``.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import support

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Upstream-pw"


def respmeter(*args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def flag_help(help_text: str, flag: str) -> str:
    """One flag's entry in --help output, whitespace collapsed (argparse wraps it over lines)."""
    m = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|\Z)", help_text, re.M | re.S)
    assert m, f"{flag} not in the help"
    return " ".join(m.group(1).split())


def test_run_help_reads_as_plain_text() -> None:
    r = respmeter("run", "--help")
    assert r.returncode == 0, r.stderr
    assert "`" not in r.stdout, [ln for ln in r.stdout.splitlines() if "`" in ln]
    assert "RESPMETER_FOO_BAR" in " ".join(r.stdout.split())


@pytest.mark.parametrize("xdg", [True, False])
def test_state_dir_help_shows_one_correct_default(tmp_path: Path, xdg: bool) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "COLUMNS": "500"}  # no wrap in the path
    if xdg:
        env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    expected = tmp_path / "xdg" / "respmeter" if xdg else tmp_path / "home" / ".local" / "state" / "respmeter"
    r = respmeter("run", "--help", env=env)
    assert r.returncode == 0, r.stderr
    entry = flag_help(r.stdout, "--state-dir")
    assert entry.count("[") == 1, entry  # one bracket: env and default
    assert "default none" not in entry, entry
    assert entry.endswith(f"[env RESPMETER_STATE_DIR; default {expected}]"), entry


def test_check_config_file_argument_has_a_help_text() -> None:
    r = respmeter("check-config", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: respmeter check-config [-h] FILE" in r.stdout
    assert re.search(r"^  FILE +\S.*config file", r.stdout, re.M), r.stdout


def test_on_cap_help_and_reference_mention_ping_and_publish() -> None:
    r = respmeter("run", "--help")
    entry = flag_help(r.stdout, "--on-cap")
    assert "PING" in entry and "PUBLISH" in entry and "idle" in entry, entry
    row = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `--on-cap` |"))
    assert "PING" in row and "PUBLISH" in row, row


@pytest.mark.parametrize("argv", [["run"], ["check-config", "x.toml"], ["usage"], ["report"], ["top"],
                                  ["hash-password"]])
def test_an_unknown_flag_is_reported_by_its_subcommand(argv: list[str], tmp_path: Path) -> None:
    r = respmeter(*argv, "--bogus", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"usage: respmeter {argv[0]} "), r.stderr
    assert r.stderr.rstrip().endswith(f"respmeter {argv[0]}: error: unrecognized arguments: --bogus"), r.stderr
    assert r.stdout == ""


def test_an_unknown_flag_before_the_subcommand_is_the_top_level_s() -> None:
    r = respmeter("--bogus", "run")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: respmeter [-h]"), r.stderr
    assert "respmeter: error: unrecognized arguments: --bogus" in r.stderr


def _taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_busy_admin_port_is_named_as_the_admin_endpoint(redis_server, tmp_path: Path) -> None:
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        r = respmeter("run", "--upstream", f"redis://default:{SECRET}@127.0.0.1:{redis_server.port}",
                      "--admin", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{support.free_port()}",
                      "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, r.stderr
    assert f"cannot listen for the admin endpoint on --admin 127.0.0.1:{port}: Address already in use" in errors[0]
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout


def test_a_busy_listen_port_is_named_with_its_listen(redis_server, tmp_path: Path) -> None:
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        r = respmeter("run", "--upstream", f"redis://default:{SECRET}@127.0.0.1:{redis_server.port}",
                      "--admin", f"127.0.0.1:{support.free_port()}",
                      "--listen", f"127.0.0.1:{support.free_port()}", "--listen", f"celery=127.0.0.1:{port}",
                      "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, r.stderr
    assert f"cannot listen for clients on --listen celery=127.0.0.1:{port}: Address already in use" in errors[0]
    assert "admin" not in errors[0]
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout


def test_the_startup_log_says_upstream_state_caps_and_on_cap(redis_factory, proxy_factory, tmp_path: Path) -> None:
    server = redis_factory(password=SECRET)
    state = tmp_path / "state"
    proxy = proxy_factory(
        f"redis://default:{SECRET}@127.0.0.1:{server.port}",
        ["--state-dir", str(state), "--daily-cap", "1500", "--monthly-cap", "45000", "--client-cap",
         "celery:daily=500", "--cap-timezone", "Europe/Paris", "--on-cap", "idle"],
        log_level="info",
    )
    assert proxy.client().ping()  # the password works: the proxy has it, the log must not
    log = proxy.log_text()
    assert SECRET not in log
    info = [ln for ln in log.splitlines() if " INFO respmeter: " in ln]
    start = next(ln for ln in info if "proxying to" in ln)
    assert f"proxying to redis://default:****@127.0.0.1:{server.port} " in start, start
    assert f"state directory {state}" in start, start
    caps = next(ln for ln in info if "caps:" in ln)
    for part in ("daily 1500", "monthly 45000", "per client celery daily=500", "timezone Europe/Paris",
                 "on_cap idle"):
        assert part in caps, (part, caps)


def test_the_startup_log_without_caps_says_none(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from proxy.cli import App
    from proxy.config import parse_upstream

    app = App({}, [], parse_upstream(f"rediss://u:{SECRET}@db.example:6380/2"), ("127.0.0.1", 9380), "asyncio")
    with caplog.at_level(logging.INFO, logger="respmeter"):
        app._log_startup(str(tmp_path))
    text = caplog.text
    assert SECRET not in text
    assert "proxying to rediss://u:****@db.example:6380/2 " in text
    assert "caps: daily none, monthly none, per client none; timezone UTC; on_cap error" in text
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]
