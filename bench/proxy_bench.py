#!/usr/bin/env python3
"""Throughput benchmark: redis-benchmark directly, through respmeter, and through twemproxy.

Starts its own processes, all on free loopback ports, and stops them on exit, Ctrl-C or SIGTERM:

* a ``redis-server`` (``--save '' --appendonly no``);
* the proxy from this repo (``python -m proxy run``, same interpreter as this script unless
  ``--python``), in front of it;
* the same proxy with ``--upstream-pool N`` (``--pool``, 1 by default; 0 skips it): its ratios to
  twemproxy are the pool's record;
* when ``nutcracker`` (twemproxy) is on PATH, a twemproxy in front of the same redis-server, with a
  one-server pool (config written to a temp dir, stats port on loopback);
* with ``--with-forwarder``, the ceilings of both designs in Python: ``bench/forwarder.py`` (one
  upstream connection per client, no parsing) and ``bench/pool_forwarder.py`` (the pool's design,
  one shared connection with the same C framing, no counting or policy); and the pool's design
  with its protocols written in C, ``bench/c_pool_forwarder.py`` (compiled on first use; skipped
  when there is no C compiler): no interpreter work per request at all.

Then for each shape (``-c 50``, ``-c 50 -P 16``, ``-c 1``) it runs ``redis-benchmark -t set,get``
against each target, interleaved (direct, proxy, twem, then twem, proxy, direct, ...) for
``--rounds`` rounds so machine noise hits all targets alike, and reports the median requests/second
per target and the ratios to direct. The pool's record against twemproxy is also given paired: the
median of each round's own ratio, with its 95% interval (distribution-free), which needs about 9
rounds or more to be narrow (``--rounds 15 --seconds 1``). Beside them, the CPU each proxy's own
process used per request, user and system (from /proc, read around each run): a steadier measure
than requests/second on a shared machine, and it tells the proxy's own work (user) from the system
calls' (system).

``-n``: unless ``--n`` is given, a short calibration run per shape and target picks the request
count so that each run (SET + GET) takes about ``--seconds`` (3 s; 1 s with ``--quick``).

    python bench/proxy_bench.py                    # 3 shapes x 3 rounds, ~2 minutes
    python bench/proxy_bench.py --quick            # 1 round, ~1 s runs
    python bench/proxy_bench.py --json out.json --min-ratio 0.3
    python bench/proxy_bench.py --extra-proxy-args="--loop asyncio"
    python bench/proxy_bench.py --compare-tracking --no-twem   # key-pattern tracking on vs off

``--compare-tracking`` adds a second proxy with ``--track-patterns false`` to the same interleaved
rounds and prints the throughput with tracking on as a share of it off (the report feature's cost).

Exit status: 0; 1 when ``--min-ratio`` is given and some proxy/direct ratio is below it; 2 when the
benchmark could not run; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# name, extra redis-benchmark args, request count used for the calibration run
SHAPES = [
    ("c50", ["-c", "50"], 20_000),
    ("c50-P16", ["-c", "50", "-P", "16"], 100_000),
    ("c1", ["-c", "1"], 4_000),
]
TESTS = ["SET", "GET"]
TARGET_NAMES = ["direct", "proxy", "pool", "twem"]


from harness import FORBIDDEN_PORTS, Procs, free_port, ready  # noqa: E402
from harness import start_proxy as _start_proxy  # noqa: E402


def retry(fn, what: str, attempts: int = 3):
    """Call fn(); on RuntimeError (a free port taken meanwhile, a benchmark run that broke) try again."""
    for i in range(attempts):
        try:
            return fn()
        except RuntimeError as exc:
            if i == attempts - 1:
                raise
            print(f"# {what} failed ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc}); retrying",
                  file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def start_redis(procs: Procs, work: Path, server: str) -> int:
    port = free_port()
    log = work / "redis.log"
    p = procs.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(work), "--daemonize", "no", "--protected-mode", "yes"], log)
    ready(procs, p, port, "redis-server", log)
    return port


def start_proxy(procs: Procs, work: Path, python: str, redis_port: int, extra: list[str],
                proxy_dir: Path) -> tuple[int, int, int]:
    """(port, admin port, pid)."""
    port, admin, p = _start_proxy(procs, work, python, redis_port, extra, proxy_dir)
    return port, admin, p.pid


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds a process (all its threads) has used, from /proc; None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # (after the command name, which may hold spaces)
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def start_twem(procs: Procs, work: Path, binary: str, redis_port: int, server_connections: int,
               mbuf: int | None) -> tuple[int, int]:
    """(port, pid)."""
    port, stats = free_port(), free_port()
    conf = work / "nutcracker.yml"
    # one pool, one server: key hashing is moot, but the pool must name a hash and distribution.
    # server_connections 1 (twemproxy's default) multiplexes every client onto one upstream
    # connection, which pipelines requests to redis and gives twemproxy its best numbers here.
    conf.write_text(
        "bench:\n"
        f"  listen: 127.0.0.1:{port}\n"
        "  redis: true\n"
        "  hash: fnv1a_64\n"
        "  distribution: ketama\n"
        "  preconnect: true\n"
        "  auto_eject_hosts: false\n"
        "  backlog: 1024\n"
        f"  server_connections: {server_connections}\n"
        "  servers:\n"
        f"    - 127.0.0.1:{redis_port}:1\n"
    )
    log = work / "nutcracker.log"
    check = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"nutcracker rejects its config: {(check.stdout + check.stderr).strip()}")
    argv = [binary, "-c", str(conf), "-s", str(stats), "-a", "127.0.0.1", "-v", "4", "-o", str(log)]
    if mbuf:
        argv += ["-m", str(mbuf)]
    p = procs.start(argv, work / "nutcracker.stdout")
    ready(procs, p, port, "nutcracker", log)
    return port, p.pid


# --------------------------------------------------------------------------------------------
# redis-benchmark
# --------------------------------------------------------------------------------------------
def run_benchmark(procs: Procs, rb: str, port: int, shape_args: list[str], n: int, work: Path,
                  timeout: float) -> tuple[dict[str, float], float]:
    """One redis-benchmark run (SET then GET); returns ({test: rps}, wall seconds)."""
    assert port not in FORBIDDEN_PORTS
    argv = [rb, "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-q", "--csv", "-n", str(n), *shape_args]
    out_path = work / "redis-benchmark.out"
    t0 = time.monotonic()
    p = procs.start(argv, out_path)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        procs.stop(p)
        raise RuntimeError(f"redis-benchmark on port {port} still running after {timeout:g}s: {shlex.join(argv)}")
    procs.stop(p)
    wall = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    rps: dict[str, float] = {}
    for line in text.splitlines():
        cells = [c.strip().strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] in TESTS:
            with contextlib.suppress(ValueError):
                rps[cells[0]] = float(cells[1])
    if p.returncode != 0 or set(rps) != set(TESTS):
        raise RuntimeError(f"redis-benchmark failed (exit {p.returncode}) on port {port}: {text.strip()[-800:]}")
    return rps, wall


def proxy_counted(admin: int) -> int | None:
    """Upstream commands the proxy counted (from its /metrics), as a sanity check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("respmeter_upstream_commands_total{"):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --------------------------------------------------------------------------------------------
def cpu_medians(samples: list[tuple[float, float]] | None) -> dict[str, float] | None:
    if not samples:
        return None
    return {"user": statistics.median(u for u, _ in samples), "system": statistics.median(s for _, s in samples)}


def fmt_rps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``xs`` (order statistics: the
    number of samples below the median is binomial(n, 1/2)); None when there are too few."""
    xs = sorted(xs)
    n = len(xs)
    tail = (1 - level) / 2
    k = -1  # the largest k with P(Binomial(n, 1/2) <= k) <= tail
    cdf = 0.0
    for i in range(n + 1):
        cdf += math.comb(n, i) / 2 ** n
        if cdf > tail:
            break
        k = i
    if k < 0:
        return None
    return xs[k], xs[n - 1 - k]


def paired(results: dict, shape: str, test: str, a: str, b: str) -> list[float]:
    """a/b in each round, the two measured minutes apart at most (the machine's load drifts
    slower than that): steadier than the ratio of the two medians."""
    ra, rb = results.get((shape, test, a)), results.get((shape, test, b))
    if not ra or not rb:
        return []
    return [x / y for x, y in zip(ra, rb) if y]


def print_table(rows: list[dict], out) -> None:
    head = ["shape", "test", "direct rps", "proxy rps", "proxy/direct", "pool rps", "pool/direct", "twemproxy rps",
            "twem/direct", "proxy/twem", "pool/twem"]
    body = [[r["shape"], r["test"], fmt_rps(r["direct"]), fmt_rps(r["proxy"]), fmt_ratio(r["proxy_ratio"]),
             fmt_rps(r.get("pool")), fmt_ratio(r.get("pool_ratio")), fmt_rps(r["twem"]), fmt_ratio(r["twem_ratio"]),
             fmt_ratio(r.get("proxy_twem")), fmt_ratio(r.get("pool_twem"))] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for i, line in enumerate([head, *body]):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per shape; the median is reported [3; 1 with --quick]")
    ap.add_argument("--n", type=int, default=None, help="fixed -n for every run (skips calibration)")
    ap.add_argument("--seconds", type=float, default=None, help="calibrated duration of one run, SET+GET [3; 1 with --quick]")
    ap.add_argument("--quick", action="store_true", help="short run: 1 round of ~1 s runs")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                    help="comma-separated subset of %(default)s")
    ap.add_argument("--extra-proxy-args", default="",
                    help='extra arguments for `python -m proxy run`, one string: --extra-proxy-args="--loop asyncio"')
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the proxy [%(default)s]")
    ap.add_argument("--proxy-dir", type=Path, default=REPO,
                    help="directory holding the `proxy` package to run, e.g. a `git archive` snapshot [this repo]")
    ap.add_argument("--no-twem", action="store_true", help="skip twemproxy even when nutcracker is installed")
    ap.add_argument("--twem-server-connections", type=int, default=1, help="twemproxy server_connections [%(default)s]")
    ap.add_argument("--twem-mbuf", type=int, default=None, help="twemproxy --mbuf-size (bytes) [its default, 16384]")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': to stdout, table to stderr)")
    ap.add_argument("--min-ratio", type=float, default=None, help="exit 1 if any proxy/direct ratio is below this")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, twemproxy config)")
    ap.add_argument("--with-forwarder", action="store_true",
                    help="also run bench/forwarder.py and (with --pool) bench/pool_forwarder.py and "
                         "bench/c_pool_forwarder.py: zero-work pass-throughs, the ceilings of the two designs")
    ap.add_argument("--pool", type=int, default=1, metavar="N",
                    help="also run respmeter with --upstream-pool N (its ratios to twemproxy are the pool's "
                         "record); 0: skip [%(default)s]")
    ap.add_argument("--compare-tracking", action="store_true",
                    help="also run a proxy with --track-patterns false and report tracking on / off")
    args = ap.parse_args(argv)

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    if rounds < 1 or rounds > 50:
        ap.error("--rounds: 1..50")
    if args.n is not None and not 1 <= args.n <= 100_000_000:
        ap.error("--n: 1..100000000")
    if not 0.1 <= seconds <= 60:
        ap.error("--seconds: 0.1..60")
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    shapes = [s for s in SHAPES if s[0] in wanted]
    if not shapes or len(shapes) != len(wanted):
        ap.error(f"--shapes: choose from {','.join(s[0] for s in SHAPES)}")
    extra_proxy = shlex.split(args.extra_proxy_args)
    args.proxy_dir = args.proxy_dir.resolve()
    if not (args.proxy_dir / "proxy" / "__main__.py").is_file():
        ap.error(f"--proxy-dir: no proxy/__main__.py under {args.proxy_dir}")
    out = sys.stderr if args.json == "-" else sys.stdout

    server, rb = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if not server or not rb:
        print("proxy_bench: redis-server and redis-benchmark must be on PATH", file=sys.stderr)
        return 2
    twem_bin = None if args.no_twem else shutil.which("nutcracker")
    if twem_bin is None and not args.no_twem:
        print("proxy_bench: nutcracker (twemproxy) not on PATH: skipping it (apt-get install nutcracker)", file=out)

    procs = Procs()

    def on_term(signum, frame):  # unwind like Ctrl-C so the children are stopped
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    results: dict[tuple[str, str, str], list[float]] = {}
    # CPU µs per request (user, system) of each target's own process, per (shape, target), a sample
    # per round: steadier than requests/second on a shared machine, and it tells where time goes
    cpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
    pids: dict[str, int] = {}
    ns: dict[tuple[str, str], int] = {}
    walls: list[float] = []
    counted = None
    try:
        redis_port = retry(lambda: start_redis(procs, work, server), "starting redis-server")
        proxy_port, admin_port, pids["proxy"] = retry(
            lambda: start_proxy(procs, work, args.python, redis_port, extra_proxy, args.proxy_dir), "starting the proxy")
        targets = {"direct": redis_port, "proxy": proxy_port}
        if args.with_forwarder:
            def start_forwarder(script: str) -> tuple[int, int]:
                port = free_port()
                log = work / f"{script}.log"
                p = procs.start([args.python, str(REPO / "bench" / f"{script}.py"), str(port), str(redis_port)], log)
                ready(procs, p, port, script, log)
                return port, p.pid

            targets["forwarder"], pids["forwarder"] = retry(lambda: start_forwarder("forwarder"),
                                                            "starting the forwarder")
            if args.pool:
                targets["pool_forwarder"], pids["pool_forwarder"] = retry(lambda: start_forwarder("pool_forwarder"),
                                                                          "starting the pooled forwarder")
                built = subprocess.run([args.python, str(REPO / "bench" / "c_pool_forwarder.py"), "--build-only"],
                                       capture_output=True, text=True, timeout=180)
                if built.returncode == 0:
                    targets["c_pool_forwarder"], pids["c_pool_forwarder"] = retry(
                        lambda: start_forwarder("c_pool_forwarder"), "starting the C pooled forwarder")
                else:
                    print("proxy_bench: skipping the C pooled forwarder: "
                          + (built.stderr.strip().splitlines() or ["it does not build"])[-1], file=out)
        if args.pool:
            targets["pool"], _, pids["pool"] = retry(
                lambda: start_proxy(procs, work, args.python, redis_port,
                                    [*extra_proxy, "--upstream-pool", str(args.pool)], args.proxy_dir),
                "starting the pooled proxy")
        if args.compare_tracking:
            targets["proxy_nt"], _, pids["proxy_nt"] = retry(
                lambda: start_proxy(procs, work, args.python, redis_port,
                                    [*extra_proxy, "--track-patterns", "false"], args.proxy_dir),
                "starting the proxy without tracking")
        if twem_bin:
            targets["twem"], pids["twem"] = retry(
                lambda: start_twem(procs, work, twem_bin, redis_port, args.twem_server_connections, args.twem_mbuf),
                "starting nutcracker")
        print(f"# redis-server :{redis_port}, proxy :{proxy_port} (admin :{admin_port})"
              + (f", twemproxy :{targets['twem']}" if "twem" in targets else "")
              + f"; {rounds} round(s), " + (f"-n {args.n}" if args.n else f"~{seconds:g}s per run"), file=out, flush=True)
        for shape, shape_args, probe_n in shapes:
            for tname, port in targets.items():
                if args.n:
                    ns[(shape, tname)] = args.n
                    continue
                # calibration (also warms up: connections, keys for GET, allocator): grow the
                # probe until it lasts long enough to time, then scale its wall time to --seconds
                n = probe_n
                for _ in range(4):
                    _rps, wall = retry(lambda: run_benchmark(procs, rb, port, shape_args, n, work, timeout=120),
                                       f"calibration {shape} {tname}", 2)
                    if wall >= 0.4 * min(seconds, 1.0) or n >= 20_000_000:
                        break
                    n *= 4
                n = int(n * seconds / max(wall, 0.01))
                ns[(shape, tname)] = max(1_000, min(n, 20_000_000))
            for rnd in range(rounds):
                # (every other round in the reverse order: a target that always ran right after
                # another would inherit that one's effect on the machine, a bias pairing cannot undo)
                order = list(targets.items()) if rnd % 2 == 0 else list(reversed(targets.items()))
                for tname, port in order:
                    n = ns[(shape, tname)]

                    def measured() -> tuple[dict[str, float], float, tuple[float, float] | None]:
                        # (the CPU read around each try: a retried run is not counted twice)
                        before = cpu_seconds(pids[tname]) if tname in pids else None
                        rps, wall = run_benchmark(procs, rb, port, shape_args, n, work,
                                                  timeout=max(120.0, 30 * seconds))
                        after = cpu_seconds(pids[tname]) if before is not None else None
                        if before is None or after is None:
                            return rps, wall, None
                        per = 1e6 / (n * len(TESTS))  # µs per request
                        return rps, wall, ((after[0] - before[0]) * per, (after[1] - before[1]) * per)

                    rps, wall, used = retry(measured, f"{shape} round {rnd + 1} {tname}", 2)
                    if used is not None:
                        cpu.setdefault((shape, tname), []).append(used)
                    walls.append(wall)
                    for test in TESTS:
                        results.setdefault((shape, test, tname), []).append(rps[test])
                    print(f"# {shape:8} round {rnd + 1}/{rounds} {tname:6} -n {n:<9} "
                          + "  ".join(f"{t} {rps[t]:>11,.0f}" for t in TESTS) + f"  ({wall:.1f}s)", file=out, flush=True)
        counted = proxy_counted(admin_port)
    except KeyboardInterrupt:
        print("\nproxy_bench: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"proxy_bench: {exc}", file=sys.stderr)
        print(f"proxy_bench: logs in {work}", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        procs.cleanup(work, args.keep)
        signal.signal(signal.SIGTERM, old_term)

    rows = []
    for shape, _a, _p in shapes:
        for test in TESTS:
            med = {t: (statistics.median(results[(shape, test, t)]) if (shape, test, t) in results else None)
                   for t in TARGET_NAMES}
            d = med["direct"]
            rows.append({
                "shape": shape, "test": test,
                "direct": d, "proxy": med["proxy"], "pool": med["pool"], "twem": med["twem"],
                "proxy_ratio": med["proxy"] / d if d and med["proxy"] is not None else None,
                "pool_ratio": med["pool"] / d if d and med["pool"] is not None else None,
                "twem_ratio": med["twem"] / d if d and med["twem"] is not None else None,
                # the record of each mode against twemproxy, in the same run
                "proxy_twem": med["proxy"] / med["twem"] if med["twem"] and med["proxy"] is not None else None,
                "pool_twem": med["pool"] / med["twem"] if med["twem"] and med["pool"] is not None else None,
                "samples": {t: results.get((shape, test, t), []) for t in TARGET_NAMES},
                # (per shape: one redis-benchmark run does SET and GET)
                "cpu_us_per_request": {t: cpu_medians(cpu.get((shape, t))) for t in pids},
                # the same round's ratios (see paired), and the 95% interval of their median
                "paired": {f"{a}_{b}": {"rounds": (r := paired(results, shape, test, a, b)),
                                        "median": statistics.median(r) if r else None,
                                        "ci95": median_ci(r) if r else None}
                           for a, b in (("pool", "twem"), ("proxy", "twem"), ("pool", "direct"))},
                "n": {t: ns.get((shape, t)) for t in TARGET_NAMES},
            })
    print(file=out)
    print_table(rows, out)
    if any(r["paired"]["pool_twem"]["rounds"] for r in rows):
        print("\npool / twemproxy, paired by round (the median of each round's ratio, its 95% interval, "
              "and the rounds' range):", file=out)
        for r in rows:
            p = r["paired"]["pool_twem"]
            if p["rounds"]:
                ci = p["ci95"]
                print(f"  {r['shape']:8} {r['test']}: {p['median']:.2f}"
                      + (f"  [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "  [too few rounds for an interval]")
                      + f"  ({min(p['rounds']):.2f} to {max(p['rounds']):.2f} over {len(p['rounds'])})", file=out)
    if cpu:
        print("\nCPU per request in each proxy's own process, user + system µs (medians over the rounds; "
              "SET and GET together):", file=out)
        for shape, _a, _p in shapes:
            cells = []
            for t in pids:
                m = cpu_medians(cpu.get((shape, t)))
                if m is not None:
                    cells.append(f"{t} {m['user']:.2f} + {m['system']:.2f}")
            print(f"  {shape:8} " + "   ".join(cells), file=out)
    if args.with_forwarder:
        print("\nzero-work forwarders (each design's ceiling), same run, medians:", file=out)
        for shape, _a, _p in shapes:
            for test in TESTS:
                med = {t: statistics.median(v)
                       for t in TARGET_NAMES + ["forwarder", "pool_forwarder", "c_pool_forwarder"]
                       if (v := results.get((shape, test, t)))}
                # (each forwarder beside the respmeter mode of its design)
                for fwd, name, mode, label in (("forwarder", "forwarder", "proxy", "respmeter"),
                                               ("pool_forwarder", "pooled forwarder", "pool", "pool"),
                                               ("c_pool_forwarder", "C pooled forwarder", "pool", "pool")):
                    f, d, p, tw = med.get(fwd), med.get("direct"), med.get(mode), med.get("twem")
                    if f and d and p:
                        print(f"  {shape:8} {test}: {name} {f:>11,.0f} rps = {f / d:.2f} of direct"
                              + (f", {f / tw:.2f} of twemproxy" if tw else "")
                              + f"; {label} = {p / f:.2f} of it", file=out)
    if args.compare_tracking:
        print("\nkey-pattern tracking on / off (same run, medians):", file=out)
        for shape, _a, _p in shapes:
            for test in TESTS:
                on = results.get((shape, test, "proxy"))
                off = results.get((shape, test, "proxy_nt"))
                if on and off:
                    r = statistics.median(on) / statistics.median(off)
                    print(f"  {shape:8} {test}: {r:.3f}", file=out)
                    for row in rows:
                        if row["shape"] == shape and row["test"] == test:
                            row["tracking_ratio"] = r
    if counted is not None:
        print(f"\n# the proxy counted {counted:,} upstream commands", file=out)
    info = {
        "redis_server": tool_version([server, "--version"]),
        "redis_benchmark": tool_version([rb, "--version"]),
        "twemproxy": tool_version([twem_bin, "--version"]) if twem_bin else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "seconds_per_run": None if args.n else seconds,
        "extra_proxy_args": extra_proxy,
        "proxy_dir": str(args.proxy_dir),
        "twem_server_connections": args.twem_server_connections if twem_bin else None,
        "proxy_counted_upstream_commands": counted,
    }
    if args.json:
        doc = json.dumps({"info": info, "results": rows}, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(doc)
        else:
            Path(args.json).write_text(doc)
    if args.min_ratio is not None:
        low = [r for r in rows if r["proxy_ratio"] is not None and r["proxy_ratio"] < args.min_ratio]
        if low:
            for r in low:
                print(f"proxy_bench: {r['shape']} {r['test']}: proxy/direct {r['proxy_ratio']:.2f} < {args.min_ratio}",
                      file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
