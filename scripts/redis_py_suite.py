#!/usr/bin/env python3
"""Run redis-py's own test suite directly against redis-server and through the proxy, and compare.

The redis-py test sources are NOT vendored: at run time this script downloads the sdist of the
installed redis-py version from PyPI (``pip download --no-deps --no-binary :all: redis==VER``) into a
temporary directory and extracts only its ``tests/`` (plus ``pyproject.toml`` for the pytest
settings), so the tests import the installed ``redis`` package.

For every protocol asked for (``--protocols 3,2``) it then runs, one after the other:

* ``direct``: pytest against a fresh ``redis-server`` on a free loopback port;
* ``proxy``:  pytest against ``python -m proxy run`` (this repo) in front of another fresh
  ``redis-server``;

with ``-m "not onlycluster and not replica"`` (the standalone selection: cluster-only tests need a
cluster, replica tests a replica at a hard-coded port; ``-m ''`` runs everything), each with a junit
XML, parses both and prints how many tests passed each way and every test that
passes directly but not through the proxy. Exit status: 0 when that list is empty, 1 when it is not,
2 when the suite could not be run at all.

Safety: some redis-py tests hard-code addresses (``redis.Redis()`` = localhost:6379, port 6380 for
replica tests, 6390 for "redis down"). A small pytest plugin written to the temp dir refuses every
socket connect that is not to 127.0.0.1/::1 on one of the ports this script started, so the suite can
never reach another server on this machine (such tests then fail the same way in both runs; they are
listed as "blocked" in the report).

Needs in the Python environment used (``--python``, default: this interpreter): redis, pytest,
pytest-timeout (``--install-deps`` pip-installs what is missing), and ``redis-server`` on PATH.

    python scripts/redis_py_suite.py                      # RESP3 and RESP2, the 3 default test files
    python scripts/redis_py_suite.py --protocols 3 --json out.json
    python scripts/redis_py_suite.py -k "pubsub" --keep   # keep the temp dir (junit xml, logs)
    python scripts/redis_py_suite.py --proxy-dir /tmp/snap  # a snapshot: git archive HEAD proxy | tar -x -C /tmp/snap
    python scripts/redis_py_suite.py --extra-proxy-args="--track-patterns false"

Runtime: about 1 minute per pytest run, so ~4 minutes for the default 2 protocols x 2 targets. With
Debian's redis-server 7.0 about 220 tests are skipped (they need a newer server): ``--redis-server``
points both runs at another binary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_commands.py", "tests/test_pubsub.py", "tests/test_pipeline.py"]
# standalone selection, as redis-py runs it against a single server: cluster-only tests need a
# cluster, replica tests a replica at the hard-coded localhost:6380
DEFAULT_MARKERS = "not onlycluster and not replica"
sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402
from harness import Procs, free_port, wait_ping  # noqa: E402

GUARD_PLUGIN = r'''
"""Written by respmeter's scripts/redis_py_suite.py: confine the suite's sockets to our servers."""
import errno
import ipaddress
import json
import os
import socket
import _socket

_ALLOWED = {int(p) for p in os.environ.get("RPS_ALLOWED_PORTS", "").split(",") if p.strip()}
_LOG = os.environ.get("RPS_GUARD_LOG")


def _allowed(family, address):
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False  # unix sockets etc.: nothing of ours is there
    host, port = address[0], address[1]
    if host == "localhost":
        ok_host = True
    else:
        try:
            ok_host = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            ok_host = False
    return ok_host and port in _ALLOWED


def _record(address):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"),
                                "address": str(address)}) + "\n")


def _connect(self, address):
    if not _allowed(self.family, address):
        _record(address)
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"blocked by redis_py_suite guard: {address!r}")
    return _socket.socket.connect(self, address)


def _connect_ex(self, address):
    if not _allowed(self.family, address):
        _record(address)
        return errno.ECONNREFUSED
    return _socket.socket.connect_ex(self, address)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
'''


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
def start_redis(procs: Procs, workdir: Path, tag: str, server: str) -> tuple[int, subprocess.Popen]:
    port = free_port()
    d = workdir / f"redis-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    argv = [
        server,
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(d), "--daemonize", "no", "--protected-mode", "yes",
        # a few suite tests use DEBUG / MODULE; allow them (same for both runs)
        "--enable-debug-command", "local", "--enable-module-command", "local",
    ]
    p = procs.start(argv, d / "redis.log")
    wait_ping(port, p, "redis-server", d / "redis.log")
    return port, p


def start_proxy(procs: Procs, workdir: Path, python: str, redis_port: int, extra: list[str],
                tag: str, proxy_dir: Path) -> tuple[int, subprocess.Popen]:
    if (proxy_dir / "proxy" / "commandpolicy.py").exists():
        # the suite needs CONFIG, DEBUG, ACL...: the proxy passes everything through, as the server
        # of the direct run does (a snapshot older than the command policy denies nothing anyway)
        extra = ["--deny-commands", "", *extra]
    port, _admin, p = harness.start_proxy(procs, workdir, python, redis_port, extra, proxy_dir, tag)
    return port, p


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------
def installed_redis_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import redis; print(redis.__version__)"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"redis-py is not importable with {python}: {out.stderr.strip()}")
    return out.stdout.strip()


def missing_modules(python: str, modules: list[str]) -> list[str]:
    code = ("import importlib.util,sys; print(' '.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def fetch_suite(python: str, version: str, workdir: Path) -> Path:
    """Download redis==VERSION's sdist from PyPI and extract its tests/ and pyproject.toml."""
    dl = workdir / "sdist"
    dl.mkdir()
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
           f"redis=={version}", "-d", str(dl)]
    print(f"# downloading the redis-py {version} sdist: {shlex.join(cmd)}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    archives = sorted(dl.glob("redis-*.tar.gz"))
    if r.returncode != 0 or not archives:
        raise RuntimeError(f"pip download failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    src = workdir / "redis-py"
    src.mkdir()
    with tarfile.open(archives[0]) as tf:
        members = []
        for m in tf.getmembers():
            parts = Path(m.name).parts
            if len(parts) < 2:
                continue
            rel = Path(*parts[1:])
            if rel.parts[0] == "tests" or str(rel) in ("pyproject.toml", "dev_requirements.txt"):
                m.name = str(rel)
                members.append(m)
        if not any(Path(m.name).parts[0] == "tests" for m in members):
            raise RuntimeError(f"the redis {version} sdist ({archives[0].name}) has no tests/ directory")
        tf.extractall(src, members=members, filter="data")
    return src


def run_pytest(python: str, src: Path, workdir: Path, tag: str, port: int, allowed: list[int],
               protocol: str, tests: list[str], extra: list[str], timeout: int) -> tuple[Path, Path, Path, int]:
    junit = workdir / f"junit-{tag}.xml"
    log = workdir / f"pytest-{tag}.log"
    guard_log = workdir / f"guard-{tag}.jsonl"
    url = f"redis://127.0.0.1:{port}"
    argv = [
        python, "-m", "pytest", *tests,
        f"--redis-url={url}", f"--redis-mod-url={url}",  # no modules server: point it at ours
        "-p", "no:cacheprovider", "-p", "rps_guard",
        "-o", "addopts=",  # the suite's pyproject adds -s
        "-q", "-rN", "--color=no", f"--junitxml={junit}", f"--timeout={timeout}",
        *(["--protocol", protocol] if protocol != "default" else []),
        *extra,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(workdir / "plugin")
    env["RPS_ALLOWED_PORTS"] = ",".join(str(p) for p in allowed)
    env["RPS_GUARD_LOG"] = str(guard_log)
    env.pop("PYTEST_ADDOPTS", None)
    print(f"# [{tag}] pytest against {url} (log: {log})", flush=True)
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        p = subprocess.Popen(argv, cwd=str(src), env=env, stdin=subprocess.DEVNULL, stdout=fh,
                             stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=3600)
        except BaseException:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            raise
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    print(f"# [{tag}] pytest exit {rc} after {time.monotonic() - t0:.0f}s: {tail[0]}", flush=True)
    return junit, log, guard_log, rc


def parse_junit(path: Path) -> dict[str, dict]:
    """nodeid -> {"outcome": passed|failed|error|skipped, "message": str, "detail": str}"""
    if not path.exists():
        raise RuntimeError(f"no junit xml at {path} (pytest crashed?)")
    results: dict[str, dict] = {}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        classname = tc.get("classname", "")
        name = tc.get("name", "")
        parts = classname.split(".")
        # tests.test_commands.TestRedisCommands -> tests/test_commands.py::TestRedisCommands
        for i in range(len(parts), 0, -1):
            if parts[i - 1].startswith("test_") or i == 1:
                mod = "/".join(parts[:i]) + ".py"
                nodeid = "::".join([mod, *parts[i:], name])
                break
        outcome, message, detail = "passed", "", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message", "") or ""
                detail = child.text or ""
                break
        # a teardown error is reported as a second <testcase> entry with the same name
        prev = results.get(nodeid)
        if prev is not None and prev["outcome"] in ("failed", "error") and outcome != "failed":
            continue
        results[nodeid] = {"outcome": outcome, "message": message, "detail": detail}
    return results


def read_guard(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                test = rec["test"].rsplit(" (", 1)[0]
                out.setdefault(test, [])
                if rec["address"] not in out[test]:
                    out[test].append(rec["address"])
    return out


def counts(res: dict[str, dict]) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for r in res.values():
        c[r["outcome"]] += 1
    c["total"] = len(res)
    return c


def short(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def run_protocol(args, procs: Procs, python: str, src: Path, workdir: Path, protocol: str) -> dict:
    tag = f"resp{protocol}"
    # direct
    rport, rproc = start_redis(procs, workdir, f"direct-{tag}", args.redis_server)
    try:
        junit_d, log_d, guard_d, rc_d = run_pytest(python, src, workdir, f"direct-{tag}", rport, [rport],
                                                   protocol, args.tests, args.pytest_args, args.timeout)
    finally:
        procs.stop(rproc)
    # through the proxy
    rport2, rproc2 = start_redis(procs, workdir, f"proxy-{tag}", args.redis_server)
    try:
        pport, pproc = start_proxy(procs, workdir, python, rport2, args.extra_proxy_args, tag, args.proxy_dir)
        try:
            junit_p, log_p, guard_p, rc_p = run_pytest(python, src, workdir, f"proxy-{tag}", pport,
                                                       [pport], protocol, args.tests, args.pytest_args,
                                                       args.timeout)
        finally:
            alive = pproc.poll() is None
            procs.stop(pproc)
        if not alive:
            print(f"# [{tag}] WARNING: the proxy had exited (status {pproc.returncode}) by the end of "
                  f"the run; see {workdir / f'proxy-{tag}.log'}", flush=True)
    finally:
        procs.stop(rproc2)
    direct, proxied = parse_junit(junit_d), parse_junit(junit_p)
    regress = sorted(t for t, r in direct.items()
                     if r["outcome"] == "passed" and proxied.get(t, {}).get("outcome") != "passed")
    improved = sorted(t for t, r in proxied.items()
                      if r["outcome"] == "passed" and direct.get(t, {}).get("outcome") != "passed")
    return {
        "protocol": protocol,
        "direct": counts(direct),
        "proxy": counts(proxied),
        "pytest_exit": {"direct": rc_d, "proxy": rc_p},
        "blocked_connects": {"direct": read_guard(guard_d), "proxy": read_guard(guard_p)},
        "pass_direct_fail_proxy": [
            {"test": t, "proxy_outcome": proxied.get(t, {}).get("outcome", "missing"),
             "message": proxied.get(t, {}).get("message", ""),
             "detail": proxied.get(t, {}).get("detail", "")}
            for t in regress
        ],
        "pass_proxy_fail_direct": [
            {"test": t, "direct_outcome": direct.get(t, {}).get("outcome", "missing"),
             "message": direct.get(t, {}).get("message", "")}
            for t in improved
        ],
        "logs": {"direct": str(log_d), "proxy": str(log_p), "proxy_server": str(workdir / f"proxy-{tag}.log")},
    }


def report(results: list[dict], verbose: bool) -> None:
    print()
    for r in results:
        d, p = r["direct"], r["proxy"]
        print(f"== RESP{r['protocol']} ==")
        print(f"  {'':8} {'passed':>7} {'failed':>7} {'error':>6} {'skipped':>8} {'total':>6}")
        for name, c in (("direct", d), ("proxy", p)):
            print(f"  {name:8} {c['passed']:>7} {c['failed']:>7} {c['error']:>6} {c['skipped']:>8} {c['total']:>6}")
        blocked = sorted(set(r["blocked_connects"]["direct"]) | set(r["blocked_connects"]["proxy"]))
        if blocked:
            print(f"  connects refused by the guard (hard-coded addresses; fail alike both ways): {len(blocked)}")
            for t in blocked:
                addrs = r["blocked_connects"]["direct"].get(t) or r["blocked_connects"]["proxy"].get(t)
                print(f"    {t}  -> {', '.join(addrs)}")
        if r["pass_proxy_fail_direct"]:
            print(f"  pass through the proxy but not directly: {len(r['pass_proxy_fail_direct'])}")
            for x in r["pass_proxy_fail_direct"]:
                print(f"    {x['test']} ({x['direct_outcome']} directly)")
        reg = r["pass_direct_fail_proxy"]
        print(f"  PASS DIRECTLY, FAIL THROUGH THE PROXY: {len(reg)}")
        for x in reg:
            print(f"    {x['test']}  [{x['proxy_outcome']}]")
            print(textwrap.indent(short(x["message"] or x["detail"], 600 if verbose else 300), "        "))
        print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with redis-py + pytest (runs the suite and the proxy) [%(default)s]")
    ap.add_argument("--redis-version", help="redis-py version to fetch tests for [the installed one]")
    ap.add_argument("--protocols", default="3,2",
                    help="comma-separated RESP versions to run the suite with: 2, 3, or 'default' [%(default)s]")
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files/node ids, relative to the sdist")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("-m", dest="markers", default=DEFAULT_MARKERS,
                    help="pytest -m expression; '' for none [%(default)s]")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server",
                    help="redis-server binary to start (both runs) [%(default)s]")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    ap.add_argument("--extra-proxy-args", default="", help="extra arguments for `python -m proxy run` (one string)")
    ap.add_argument("--proxy-dir", type=Path, default=REPO,
                    help="directory holding the `proxy` package to run, e.g. a `git archive` snapshot [this repo]")
    ap.add_argument("--timeout", type=int, default=60, help="per-test timeout, seconds (pytest-timeout) [%(default)s]")
    ap.add_argument("--install-deps", action="store_true", help="pip-install missing pytest plugins first")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (junit xml, logs)")
    ap.add_argument("--json", metavar="FILE", help="write the full results (with failure details) as JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.pytest_args = (shlex.split(args.pytest_args) + (["-k", args.keyword] if args.keyword else [])
                        + (["-m", args.markers] if args.markers else []))
    args.extra_proxy_args = shlex.split(args.extra_proxy_args)
    args.proxy_dir = args.proxy_dir.resolve()
    if not (args.proxy_dir / "proxy" / "__main__.py").is_file():
        ap.error(f"--proxy-dir: no proxy/__main__.py under {args.proxy_dir}")
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if any(p not in ("2", "3", "default") for p in protocols) or not protocols:
        ap.error("--protocols: 2, 3 or default, comma-separated")

    if shutil.which(args.redis_server) is None:
        print(f"redis_py_suite: {args.redis_server} not found", file=sys.stderr)
        return 2
    python = args.python
    missing = missing_modules(python, ["redis", "pytest", "pytest_timeout"])
    if missing and args.install_deps:
        pkgs = {"pytest_timeout": "pytest-timeout"}
        subprocess.run([python, "-m", "pip", "install", "-q", *(pkgs.get(m, m) for m in missing)],
                       check=False, timeout=600)
        missing = missing_modules(python, ["redis", "pytest", "pytest_timeout"])
    if missing:
        print(f"redis_py_suite: missing in {python}: {', '.join(missing)} "
              f"(pip install {' '.join(m.replace('_', '-') for m in missing)}, or use --install-deps)",
              file=sys.stderr)
        return 2

    procs = Procs()

    def on_term(signum, frame):  # SIGTERM: unwind like Ctrl-C so children are stopped
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="redis-py-suite-"))
    results: list[dict] = []
    try:
        version = args.redis_version or installed_redis_version(python)
        src = fetch_suite(python, version, workdir)
        (workdir / "plugin").mkdir()
        (workdir / "plugin" / "rps_guard.py").write_text(GUARD_PLUGIN)
        server_version = subprocess.run([args.redis_server, "--version"], capture_output=True, text=True,
                                        timeout=30).stdout.strip()
        print(f"# redis-py {version} tests {' '.join(args.tests)}; {server_version}; proxy from "
              f"{args.proxy_dir}", flush=True)
        for proto in protocols:
            results.append(run_protocol(args, procs, python, src, workdir, proto))
    except KeyboardInterrupt:
        print("\nredis_py_suite: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"redis_py_suite: {exc}", file=sys.stderr)
        return 2
    finally:
        procs.cleanup(workdir, args.keep)
        signal.signal(signal.SIGTERM, old_term)

    report(results, args.verbose)
    if args.json:
        Path(args.json).write_text(json.dumps({"redis_py": version, "redis_server": server_version, "tests": args.tests,
                                               "pytest_args": args.pytest_args, "proxy_dir": str(args.proxy_dir),
                                               "runs": results},
                                              indent=1) + "\n")
    bad = sum(len(r["pass_direct_fail_proxy"]) for r in results)
    summary = ", ".join(f"RESP{r['protocol']}: direct {r['direct']['passed']} passed, proxy "
                        f"{r['proxy']['passed']} passed, {len(r['pass_direct_fail_proxy'])} regressions"
                        for r in results)
    print(f"redis_py_suite: {summary}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
