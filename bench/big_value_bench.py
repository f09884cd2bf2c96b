#!/usr/bin/env python3
"""A very large value through the proxy: memory held and the stall other clients see.

Starts a ``redis-server`` (``proto-max-bulk-len`` above the value) and respmeter in front of it, on
free loopback ports, and stops them on exit. Then, for each target (direct, then the proxy), one
client SETs and GETs a value of ``--mb`` MiB (500 by default) while a bystander client PINGs every
5 ms. It prints, per target:

* the SET and GET times, and the throughput;
* the bystander's worst and 99th-percentile round trip during the transfer (its PINGs reach the
  server, so they include the server's own stalls: a 500 MB value takes the server itself hundreds of
  milliseconds to allocate and free, as the direct run shows);
* for the proxy, the worst round trip of a second bystander whose commands the proxy answers itself
  (``CONFIG GET``, refused by the default command policy): the stall of the proxy's own event loop;
* for the proxy, the peak growth of its RSS over its idle RSS (sampled every 10 ms).

The figures that matter are bounds measured in the same run: the proxy's peak RSS growth as a share
of the value, and the worst stall of its event loop.

    python bench/big_value_bench.py              # 500 MiB
    python bench/big_value_bench.py --mb 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Procs, free_port, ready, start_proxy  # noqa: E402


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one simple reply line (+OK, +PONG) from ``sock``."""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    i = buf.index(b"\r\n")
    line = bytes(buf[:i])
    del buf[: i + 2]
    return line


def set_and_get(port: int, size: int) -> tuple[float, float]:
    """SET a value of ``size`` bytes, sent in 1 MiB writes, then GET it back (read and checked in
    pieces, never held whole): the two durations."""
    piece = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(b"*3\r\n$3\r\nSET\r\n$9\r\nbig:value\r\n$%d\r\n" % size)
        left = size
        while left:
            n = min(left, len(piece))
            s.sendall(piece[:n])
            left -= n
        s.sendall(b"\r\n")
        buf = bytearray()
        assert _read_reply(s, buf) == b"+OK"
        t1 = time.perf_counter()
        s.sendall(_cmd(b"GET", b"big:value"))
        header = _read_reply(s, buf)
        assert header == b"$%d" % size, header[:40]
        want = size + 2
        got = len(buf)
        while got < want:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed mid-value")
            got += len(chunk)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


class Bystander(threading.Thread):
    def __init__(self, port: int, local: bool = False) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rtts: list[float] = []
        self.stop = threading.Event()
        # local: a command the proxy refuses itself (the default command policy denies CONFIG)
        self.request, self.reply = (_cmd(b"CONFIG", b"GET", b"maxmemory"), b"-NOPERM") if local else (_cmd(b"PING"), b"+PONG")

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            buf = bytearray()
            while not self.stop.is_set():
                t0 = time.perf_counter()
                s.sendall(self.request)
                assert _read_reply(s, buf).startswith(self.reply)
                self.rtts.append(time.perf_counter() - t0)
                time.sleep(0.005)


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.01)


def measure(port: int, size: int, pid: int | None) -> dict:
    by = Bystander(port)
    loop = Bystander(port, local=True) if pid is not None else None
    rss = RssPeak(pid) if pid is not None else None
    by.start()
    if loop is not None:
        loop.start()
    if rss is not None:
        rss.start()
    time.sleep(0.2)
    t_set, t_get = set_and_get(port, size)
    by.stop.set()
    by.join(10)
    out = {
        "set_seconds": round(t_set, 3),
        "get_seconds": round(t_get, 3),
        "bystander_worst_ms": round(max(by.rtts) * 1000, 1),
        "bystander_p99_ms": round(statistics.quantiles(by.rtts, n=100)[98] * 1000, 1) if len(by.rtts) > 2 else None,
        "bystander_pings": len(by.rtts),
    }
    if loop is not None:
        loop.stop.set()
        loop.join(10)
        out["event_loop_worst_ms"] = round(max(loop.rtts) * 1000, 1)
        out["event_loop_p99_ms"] = round(statistics.quantiles(loop.rtts, n=100)[98] * 1000, 1)
    if rss is not None:
        rss.stop.set()
        rss.join(5)
        out["proxy_rss_peak_growth_mb"] = round(rss.peak / 2**20, 1)
        out["proxy_rss_peak_growth_share"] = round(rss.peak / size, 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=500, help="value size in MiB [500]")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    size = args.mb << 20
    work = Path(tempfile.mkdtemp(prefix="respmeter-bigvalue-"))
    procs = Procs()
    try:
        rport = free_port()
        rlog = work / "redis.log"
        redis = procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--proto-max-bulk-len", str(max(size * 2, 512 << 20)),
                             "--dir", str(work)], rlog)
        ready(procs, redis, rport, "redis-server", rlog)
        pport, _admin, proxy = start_proxy(procs, work, args.python, rport, ["--max-bulk", str(size * 2)], REPO)
        results = {
            "value_mb": args.mb,
            "direct": measure(rport, size, None),
            "respmeter": measure(pport, size, proxy.pid),
        }
        d, p = results["direct"], results["respmeter"]
        print(f"value: {args.mb} MiB")
        for name, r in (("direct", d), ("respmeter", p)):
            print(f"{name:>10}: SET {r['set_seconds']:.2f}s  GET {r['get_seconds']:.2f}s  "
                  f"bystander worst {r['bystander_worst_ms']:.0f} ms (p99 {r['bystander_p99_ms']} ms)")
        print(f"respmeter peak RSS growth: {p['proxy_rss_peak_growth_mb']} MiB "
              f"({p['proxy_rss_peak_growth_share']:.2%} of the value)")
        print(f"respmeter event loop: worst {p['event_loop_worst_ms']} ms, p99 {p['event_loop_p99_ms']} ms "
              "(commands the proxy answers itself)")
        print(f"time through respmeter / direct: SET {p['set_seconds'] / d['set_seconds']:.2f}, "
              f"GET {p['get_seconds'] / d['get_seconds']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    finally:
        procs.cleanup(work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
