#!/usr/bin/env python3
"""An idle Celery worker's upstream traffic through respmeter, without savers and with ``--savers``.

Starts, all at once and on free loopback ports (so both modes share the machine's noise), and stops
on exit, Ctrl-C or SIGTERM:

* two ``redis-server`` (``--save '' --appendonly no``);
* two proxies from this repo, each with a temporary state dir: one fully transparent (no
  ``--savers``), one with ``--savers celery`` (or ``--savers LIST``);
* two real Celery workers, default settings and default (prefork) pool: ``celery -A app worker``
  with broker AND result backend = its proxy.

Once both workers are ready (and ``--settle`` seconds more for mingle and the first sweeps) it
counts ``--seconds`` of idle time (300 by default) and prints per mode the upstream commands by
command from the server's own ``INFO commandstats`` delta over the window, the projection per day
(x 86400 / seconds), and the ratio without / with savers. The server's delta leaves out what no
client sent: this script's own INFO / CLIENT LIST reads and the commands kombu's Lua scripts call
inside an EVALSHA (listed apart, from ``MONITOR``); a blocking BRPOP is counted by Redis when it
returns, so the one blocked at each end of the window is accounted for. The proxy's own
``respmeter_upstream_commands_total`` over the same window is printed next to it and must be equal.

``--tasks N`` then sends N tasks to each worker, one at a time with random pauses (up to 2.5 s, so
the poll is caught in any state), from a producer through each proxy, and prints the pickup latency
(send to task start) p50 / p99 / max.

    .venv/bin/python bench/celery_idle_bench.py                  # 300 s idle, ~5.5 minutes
    .venv/bin/python bench/celery_idle_bench.py --seconds 60     # a quick check
    .venv/bin/python bench/celery_idle_bench.py --seconds 120 --tasks 50 --json out.json
    .venv/bin/python bench/celery_idle_bench.py --savers poll,events

Exit status: 0; 1 when the proxy's count differs from the server's; 2 when the benchmark could not
run; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import FORBIDDEN_PORTS, Procs, ready, start_proxy  # noqa: E402
from harness import free_port  # noqa: E402

APP = textwrap.dedent(
    '''
    import os
    import time

    from celery import Celery

    url = os.environ["BENCH_URL"]
    app = Celery("benchapp", broker=url, backend=url)  # default settings


    @app.task(name="benchapp.probe")
    def probe():
        return time.time()
    '''
)

MODES = ("without savers", "with savers")


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^respmeter_upstream_commands_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_COMMAND = re.compile(r'(?:^|,)command="((?:[^"\\]|\\.)*)"')


def upstream_counts(admin_port: int) -> dict[str, int]:
    """The proxy's respmeter_upstream_commands_total by command (all other labels summed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        c = _COMMAND.search(m.group("labels"))
        if c:
            out[c.group(1)] += int(float(m.group("value")))
    return {k: v for k, v in out.items() if v}


class LuaMonitor:
    """MONITOR on a redis-server: when and what kombu's Lua scripts called (``[0 lua]`` lines)."""

    def __init__(self, port: int) -> None:
        assert port not in FORBIDDEN_PORTS
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
        self.buf = b""
        self.calls: list[tuple[float, str]] = []
        self.last_ts = 0.0
        self.stop = threading.Event()
        if self._line() != b"+OK":
            raise RuntimeError("MONITOR refused")
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if self.stop.is_set():
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _run(self) -> None:
        while not self.stop.is_set():
            line = self._line()
            if line is None:
                return
            ts_text, _, rest = line[1:].decode(errors="replace").partition(" ")
            try:
                ts = float(ts_text)
            except ValueError:
                continue
            client, _, args = rest.partition("] ")
            if client.endswith(" lua"):
                words = [w for w in args.split('"') if w.strip()]
                self.calls.append((ts, words[0].lower() if words else "?"))
            self.last_ts = ts

    def between(self, t0: float, t1: float) -> collections.Counter:
        return collections.Counter(name for ts, name in list(self.calls) if t0 < ts < t1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


class Observer:
    """A direct redis-py connection taking consistent snapshots (nothing ran while reading)."""

    def __init__(self, port: int, admin_port: int) -> None:
        import redis

        assert port not in FORBIDDEN_PORTS
        self.r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        self.admin_port = admin_port
        self.n_info = 0
        self.n_cl = 0

    def _read(self) -> dict:
        n_info, n_cl = self.n_info, self.n_cl
        info = self.r.info("commandstats")
        self.n_info += 1
        t = time.time()
        cs = {k[len("cmdstat_"):]: int(v.get("calls", 0)) + int(v.get("rejected_calls", 0))
              for k, v in info.items() if k.startswith("cmdstat_")}
        clients = self.r.client_list()
        self.n_cl += 1
        blocked = collections.Counter(c["cmd"] for c in clients if "b" in c.get("flags", ""))
        return {"cs": cs, "t": t, "blocked": blocked, "n_info": n_info, "n_cl": n_cl}

    def snapshot(self) -> dict:
        own = lambda cs: {k: v for k, v in cs.items() if k not in ("info", "client|list")}  # noqa: E731
        for _ in range(300):
            m1 = upstream_counts(self.admin_port)
            a = self._read()
            m2 = upstream_counts(self.admin_port)
            b = self._read()
            if m1 == m2 and own(a["cs"]) == own(b["cs"]) and a["blocked"] == b["blocked"]:
                return {**a, "proxy": m1}
            time.sleep(0.03)
        raise RuntimeError("no quiet instant for a consistent snapshot")

    def window(self, a: dict, b: dict, lua: collections.Counter) -> dict[str, int]:
        """The commands clients sent between two snapshots, by the server's count."""
        out = {}
        for name in set(a["cs"]) | set(b["cs"]) | set(a["blocked"]) | set(b["blocked"]):
            d = b["cs"].get(name, 0) - a["cs"].get(name, 0)
            if name == "info":
                d -= b["n_info"] - a["n_info"]
            elif name == "client|list":
                d -= b["n_cl"] - a["n_cl"]
            d -= lua.get(name, 0)
            d += b["blocked"].get(name, 0) - a["blocked"].get(name, 0)
            if d:
                out[name] = d
        return out


# --------------------------------------------------------------------------------------------
# the stacks
# --------------------------------------------------------------------------------------------
def start_redis(procs: Procs, work: Path, tag: str) -> int:
    port = free_port()
    d = work / f"redis-{tag}"
    d.mkdir()
    log = d / "redis.log"
    p = procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(d), "--daemonize", "no"], log)
    ready(procs, p, port, "redis-server", log)
    return port


def start_worker(procs: Procs, work: Path, python: str, tag: str, url: str, concurrency: int | None):
    d = work / f"worker-{tag}"
    d.mkdir()
    (d / "benchapp.py").write_text(APP)
    env = dict(os.environ, BENCH_URL=url, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(d) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    argv = [python, "-m", "celery", "-A", "benchapp", "worker", "-n", f"{tag}@%h", "--loglevel", "info"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    log = d / "worker.log"
    return procs.start(argv, log, cwd=str(d), env=env), log


def wait_ready(proc, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"celery worker not ready:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def latency(urls: dict[str, str], n: int, seed: int = 7) -> dict[str, dict]:
    from celery import Celery

    apps = {mode: Celery("benchprod", broker=url, backend=url) for mode, url in urls.items()}
    rng = random.Random(seed)
    got: dict[str, list[float]] = {mode: [] for mode in urls}
    try:
        for mode, app in apps.items():  # warm up
            app.send_task("benchapp.probe").get(timeout=30)
        for _ in range(n):
            time.sleep(rng.uniform(0.0, 2.5))
            for mode, app in apps.items():
                t0 = time.time()
                started = app.send_task("benchapp.probe").get(timeout=30)
                got[mode].append(started - t0)
    finally:
        for app in apps.values():
            app.close()

    def rank(v: list[float], q: float) -> float:
        s = sorted(v)
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {mode: {"n": len(v), "p50_ms": round(1000 * statistics.median(v), 1),
                   "p99_ms": round(1000 * rank(v, 0.99), 1), "max_ms": round(1000 * max(v), 1)}
            for mode, v in got.items()}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def per_day(n: int, seconds: float) -> int:
    return round(n * 86400 / seconds)


def markdown(res: dict, savers: str) -> str:
    off, on = res["modes"][MODES[0]], res["modes"][MODES[1]]
    names = sorted(set(off["server"]) | set(on["server"]), key=lambda c: (-off["server"].get(c, 0), c))
    rows = [f"| command | without savers: {off['seconds']:.0f} s | per day | `--savers {savers}`: "
            f"{on['seconds']:.0f} s | per day |", "|---|---:|---:|---:|---:|"]
    for c in names:
        a, b = off["server"].get(c, 0), on["server"].get(c, 0)
        rows.append(f"| {c.upper()} | {a:,} | {per_day(a, off['seconds']):,} | {b:,} | {per_day(b, on['seconds']):,} |")
    ta, tb = off["total"], on["total"]
    rows.append(f"| **total** | **{ta:,}** | **{per_day(ta, off['seconds']):,}** | **{tb:,}** | "
                f"**{per_day(tb, on['seconds']):,}** |")
    ratio = res["ratio"]
    rows.append("")
    rows.append(f"Without / with savers: **{ratio:.1f}x**" if ratio != math.inf else
                "Without / with savers: no upstream command at all with savers")
    if res.get("latency"):
        rows.append("")
        rows.append("| pickup latency | n | p50 | p99 | max |")
        rows.append("|---|---:|---:|---:|---:|")
        for mode, s in res["latency"].items():
            rows.append(f"| {mode} | {s['n']} | {s['p50_ms']} ms | {s['p99_ms']} ms | {s['max_ms']} ms |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="idle window counted [300]")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds after both workers are ready, before the window [5]")
    ap.add_argument("--savers", default="celery", help="saver list of the second proxy [celery]")
    ap.add_argument("--tasks", type=int, default=0, help="after the window, N tasks per mode for pickup latency [0]")
    ap.add_argument("--concurrency", type=int, default=None, help="worker -c (default: celery's, the CPU count)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the proxies and workers")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    if args.seconds <= 0:
        ap.error("--seconds must be positive")

    work = Path(tempfile.mkdtemp(prefix="respmeter-celery-idle-"))
    procs = Procs()

    def on_term(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    monitors: list[LuaMonitor] = []
    try:
        try:
            stacks = {}
            for mode, tag, extra in ((MODES[0], "off", []), (MODES[1], "on", ["--savers", args.savers])):
                rport = start_redis(procs, work, tag)
                pport, admin, _ = start_proxy(procs, work, args.python, rport, extra, REPO, tag=tag)
                url = f"redis://127.0.0.1:{pport}/0"
                stacks[mode] = {"redis": rport, "proxy": pport, "admin": admin, "url": url}
            for mode, st in stacks.items():
                st["worker"], st["log"] = start_worker(procs, work, args.python, "off" if mode == MODES[0] else "on",
                                                       st["url"], args.concurrency)
            for st in stacks.values():
                wait_ready(st["worker"], st["log"])
        except RuntimeError as exc:
            print(f"could not start: {exc}", file=sys.stderr)
            return 2
        print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
              f"workers ready; settling {args.settle:g} s, then {args.seconds:g} s idle", file=sys.stderr, flush=True)
        time.sleep(args.settle)
        for st in stacks.values():
            st["obs"] = Observer(st["redis"], st["admin"])
            st["mon"] = LuaMonitor(st["redis"])
            monitors.append(st["mon"])
        for st in stacks.values():
            st["a"] = st["obs"].snapshot()
        time.sleep(args.seconds)
        res: dict = {"seconds": args.seconds, "savers": args.savers, "modes": {}}
        mismatch = False
        for mode, st in stacks.items():
            b = st["obs"].snapshot()
            st["obs"].r.ping()
            deadline = time.monotonic() + 5
            while st["mon"].last_ts <= b["t"] and time.monotonic() < deadline:
                time.sleep(0.02)
            a = st["a"]
            lua = st["mon"].between(a["t"], b["t"])
            server = st["obs"].window(a, b, lua)
            proxy = {k: b["proxy"].get(k, 0) - a["proxy"].get(k, 0) for k in set(a["proxy"]) | set(b["proxy"])}
            proxy = {k: v for k, v in proxy.items() if v}
            # commands Redis 7.0 does not know (CLIENT SETINFO ...) reach it but are not in commandstats
            differs = {k: (proxy.get(k, 0), server.get(k, 0)) for k in set(proxy) | set(server)
                       if proxy.get(k, 0) != server.get(k, 0) and k in server}
            alive = st["worker"].poll() is None
            res["modes"][mode] = {"seconds": b["t"] - a["t"], "server": server, "proxy": proxy, "lua_calls": dict(lua),
                                  "total": sum(server.values()), "proxy_differs": differs, "worker_alive": alive}
            mismatch |= bool(differs)
        off, on = res["modes"][MODES[0]], res["modes"][MODES[1]]
        res["ratio"] = (off["total"] / off["seconds"]) / (on["total"] / on["seconds"]) if on["total"] else math.inf
        if args.tasks > 0:
            res["latency"] = latency({mode: st["url"] for mode, st in stacks.items()}, args.tasks)

        for mode in MODES:
            r = res["modes"][mode]
            label = mode if mode == MODES[0] else f"with --savers {args.savers}"
            print(f"{label}: {r['total']:,} upstream commands in {r['seconds']:.1f} s "
                  f"= {per_day(r['total'], r['seconds']):,}/day"
                  + ("" if r["worker_alive"] else "  (THE WORKER EXITED)"))
            for c, n in sorted(r["server"].items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"  {c:<22} {n:>7,}  {per_day(n, r['seconds']):>10,}/day")
            if r["lua_calls"]:
                print(f"  (inside Lua scripts, not sent by a client: {dict(sorted(r['lua_calls'].items()))})")
            print(f"  the proxy's own count: {'equal' if not r['proxy_differs'] else 'DIFFERS ' + str(r['proxy_differs'])}")
        print(f"ratio without / with savers: {res['ratio']:.1f}x" if res["ratio"] != math.inf
              else "ratio: no upstream command at all with savers")
        if res.get("latency"):
            for mode, s in res["latency"].items():
                print(f"pickup latency {mode}: n={s['n']} p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms")
        print()
        print(markdown(res, args.savers))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        return 1 if mismatch else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for m in monitors:
            m.close()
        procs.cleanup(work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
