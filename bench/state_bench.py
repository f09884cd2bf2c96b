#!/usr/bin/env python3
"""The cost of sharing the caps through Redis (``--state-url``), against SQLite, in one run.

Starts on free loopback ports an upstream ``redis-server``, a state ``redis-server``, and two
proxies in front of the upstream, both with a large daily cap (so every command is budgeted): one
with its state in SQLite (``--state-dir``, the default) and one with ``--state-url`` the state
server. Then:

1. throughput: ``redis-benchmark -t set,get -c 50`` against each, interleaved over ``--rounds``
   (medians), and the ratio shared / SQLite;
2. overhead at a low rate: a client sends ``--rate`` commands a second (10) through a fresh shared
   proxy, ``--warmup`` seconds (120: its blocks grow to the rate) and then ``--seconds`` (300) more,
   and MONITOR on the state server says how many commands the proxy sent it (EVAL, HGETALL; not
   what the scripts ran inside it, which INFO commandstats would count too): a share of the
   commands it budgeted.

    .venv/bin/python bench/state_bench.py                 # about 6 minutes
    .venv/bin/python bench/state_bench.py --seconds 60    # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Procs, free_port, ready, start_proxy  # noqa: E402
from proxy_bench import run_benchmark  # noqa: E402

CAP = "1000000000"


def start_redis(procs: Procs, work: Path, server: str, tag: str) -> int:
    port = free_port()
    log = work / f"redis-{tag}.log"
    p = procs.start([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                     "--dir", str(work)], log)
    ready(procs, p, port, f"redis-server ({tag})", log)
    return port


def command(port: int, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args))
        out = b""
        while not out.endswith(b"\r\n") or out.startswith(b"$") and out.count(b"\r\n") < 2:
            out += s.recv(1 << 20)
        return out


class Monitor:
    """MONITOR on the state server, counting the commands clients sent it: INFO commandstats would
    also count what the Lua scripts ran inside it (their HGETALLs, EXPIREs, ...), which nobody sent
    and no host bills ("[0 lua]" in MONITOR's lines)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
        self.sent = 0
        self.buf = b""
        self.sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            self.buf += data
            *lines, self.buf = self.buf.split(b"\r\n")
            for line in lines:
                if line.startswith(b"+") and b" [" in line and not line.split(b"]", 1)[0].endswith(b" lua"):
                    self.sent += 1

    def count(self) -> int:
        time.sleep(0.3)  # (what was sent just before is read)
        return self.sent

    def close(self) -> None:
        self.stop = True
        self.sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="low-rate window [%(default)s]")
    ap.add_argument("--warmup", type=float, default=120.0,
                    help="seconds at the same rate before counting (blocks grow to the rate first) [%(default)s]")
    ap.add_argument("--rate", type=float, default=10.0, help="commands per second in the low-rate window [%(default)s]")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (0: skip) [%(default)s]")
    ap.add_argument("-n", type=int, default=100_000, help="redis-benchmark requests per run [%(default)s]")
    args = ap.parse_args()
    server, rb = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if not server or not rb:
        print("state_bench: redis-server and redis-benchmark must be on PATH", file=sys.stderr)
        return 2
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="state-bench-"))
    try:
        upstream = start_redis(procs, work, server, "upstream")
        state = start_redis(procs, work, server, "state")
        sqlite_port, _, _ = start_proxy(procs, work, sys.executable, upstream, ["--daily-cap", CAP], REPO, "sqlite")
        shared_port, _, _ = start_proxy(procs, work, sys.executable, upstream,
                                        ["--daily-cap", CAP, "--state-url", f"redis://127.0.0.1:{state}"], REPO,
                                        "shared")
        rps: dict[str, dict[str, list[float]]] = {"sqlite": {}, "shared": {}}
        for r in range(args.rounds):
            for name, port in (("sqlite", sqlite_port), ("shared", shared_port)):
                got, _ = run_benchmark(procs, rb, port, ["-c", "50"], args.n, work, 300)
                for test, v in got.items():
                    rps[name].setdefault(test, []).append(v)
                print(f"# round {r + 1}/{args.rounds} {name:<6} " + "  ".join(f"{t} {v:,.0f}" for t, v in got.items()),
                      file=sys.stderr)
        if args.rounds:
            print("| test | SQLite rps | --state-url rps | shared / SQLite |")
            print("|---|---:|---:|---:|")
        for test in rps["sqlite"]:
            a, b = statistics.median(rps["sqlite"][test]), statistics.median(rps["shared"][test])
            print(f"| {test} | {a:,.0f} | {b:,.0f} | **{b / a:.2f}** |")

        # a quiet client, as an idle app would be, through a fresh proxy (no blocks held yet)
        quiet_port, _, _ = start_proxy(procs, work, sys.executable, upstream,
                                       ["--daily-cap", CAP, "--state-url", f"redis://127.0.0.1:{state}"], REPO,
                                       "quiet")
        with socket.create_connection(("127.0.0.1", quiet_port), timeout=5) as s:

            def steady(seconds: float) -> int:
                sent = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds:
                    s.sendall(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
                    s.recv(64)
                    sent += 1
                    time.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
                return sent

            mon = Monitor(state)
            first = mon.count()
            warm = steady(args.warmup)
            before = mon.count()
            sent = steady(args.seconds)
            spent = mon.count() - before
            mon.close()
        print(f"\nwarm-up: {warm} commands budgeted, {before - first} commands to the state store "
              f"({100 * (before - first) / max(1, warm):.2f}%)")
        print(f"\nat {args.rate:g} commands/s for {args.seconds:g} s: {sent} commands budgeted, {spent} commands "
              f"to the state store = {100 * spent / max(1, sent):.2f}% overhead")
        return 0
    finally:
        procs.cleanup(work, keep=False)


if __name__ == "__main__":
    sys.exit(main())
