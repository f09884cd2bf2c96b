"""The README is a contract: its commands are the ones CI runs, and it documents every flag,
environment variable and metric the proxy has."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.options import RUN_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands_after(marker: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if marker in ln]


def test_ci_runs_the_readme_test_command() -> None:
    test_cmds = _commands_after("pytest")
    assert len(test_cmds) == 1, test_cmds
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in [ln.strip() for ln in ci], "the README test command must be a line of .ci/run"


def test_readme_has_an_install_and_run_command() -> None:
    run = _commands_after("respmeter run")
    assert any("pip install" in c for c in run), run


def test_every_option_is_documented() -> None:
    for o in RUN_OPTIONS:
        assert f"`{o.flag}`" in README, o.flag
        assert f"`{o.env}`" in README, o.env


def test_every_metric_is_documented(proxy_factory, redis_server) -> None:
    proxy = proxy_factory(redis_server, ["--daily-cap", "1000"])
    proxy.client().ping()
    names = set()
    for line in proxy.metrics_text().splitlines():
        if line.startswith("# TYPE respmeter_"):
            _, _, name, kind = line.split()
            names.add(name + ("_total" if kind == "counter" and not name.endswith("_total") else ""))
    names.discard("respmeter_build")  # exported as respmeter_build_info
    names.add("respmeter_build_info")
    assert len(names) >= 15
    for name in names:
        assert f"`{name}`" in README, name
