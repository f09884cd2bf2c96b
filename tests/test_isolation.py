"""The suite never touches the user's own respmeter state (issue 11, point 1)."""

from __future__ import annotations

import os
from pathlib import Path

import support


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    if not d.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_a_test_proxy_keeps_its_state_in_its_own_temporary_folder(redis_server, proxy_factory) -> None:
    home_state = Path.home() / ".local" / "state" / "respmeter"
    before = _snapshot(home_state)
    # the session's XDG_STATE_HOME is a temporary folder, not the user's
    xdg = os.environ.get("XDG_STATE_HOME", "")
    assert xdg and Path(xdg).resolve() != (Path.home() / ".local" / "state").resolve()
    proxy = proxy_factory(redis_server, ["--daily-cap", "1000000"])
    state = proxy.workdir / "state"
    assert proxy.argv[proxy.argv.index("--state-dir") + 1] == str(state)
    c = proxy.client()
    for i in range(50):
        c.incr("isolation:n")
    # the proxy flushes usage every second: it lands in the test's folder, nowhere else
    support.eventually(lambda: (state / "usage.sqlite3").exists(), timeout=5)
    proxy.terminate()
    assert _snapshot(home_state) == before
