"""Issue 12 (savers), acceptance: a real, default Celery worker behind the proxy, with and without
``--savers celery``.

One redis-server, one proxy and one worker per mode (``off``: no ``--savers`` flag; ``on``:
``--savers celery``; ``pool``: ``--upstream-pool 2``, issue 14's Celery acceptance: the worker
pins at its first BRPOP, exact counts, 1,000 tasks with no loss), started once for the module and
shared by the tests. The stacks run side by side: the idle window and the SIGTERM timing are
measured on all at once, so the machine's noise is shared.

The worker is ``celery -A rmsav worker -c 2`` (the default prefork pool, two processes, as most
deployments run it; only the node name is set, nothing that changes its Redis traffic). Its broker
AND result backend are the proxy, on a fixed loopback port the proxy listens on in addition to its
own (``--listen`` is repeatable), so the proxy can be restarted on the same port. Producers run in
this process: one through the proxy, one connected straight to the redis-server.

The task (``rmsav.probe``) returns ``time.time()`` taken when it starts (pickup latency = that minus
the time just before ``send_task``) and, for the no-loss runs, counts its own runs with ``HINCRBY``
on a connection straight to the redis-server, so a run is recorded even while the proxy is down.

The ``on`` mode is skipped while ``respmeter run --help`` does not list ``--savers``.
``RESPMETER_TEST_SAVERS`` overrides the saver list of the ``on`` mode (default ``celery``).
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

pytestmark = pytest.mark.slow

SAVERS = os.environ.get("RESPMETER_TEST_SAVERS", "celery")
# off: one upstream connection per client; on: --savers; pool: --upstream-pool 2 (the worker pins
# at its first BRPOP, the producers' plain commands share the pool)
MODES = ["off", "on", "pool"]
IDLE_SECONDS = 20.0
SETTLE_SECONDS = 3.0  # after the workers are ready (mingle, first sweeps), before the idle window
LOAD_TASKS = 1000
PROXY_LOG_LEVEL = os.environ.get("RESPMETER_TEST_PROXY_LOG", "info")  # debug: every command in the log

APP = textwrap.dedent(
    '''
    import os
    import time

    import redis
    from celery import Celery

    url = os.environ["RMSAV_URL"]
    app = Celery("rmsav", broker=url, backend=url)  # default settings otherwise

    _direct = None


    def _server():
        """A connection straight to the redis-server (not through the proxy), one per process."""
        global _direct
        if _direct is None:
            _direct = redis.Redis.from_url(os.environ["RMSAV_DIRECT_URL"])
        return _direct


    @app.task(name="rmsav.probe")
    def probe(tag=None, runs_key=None):
        started = time.time()
        if runs_key:
            _server().pipeline(transaction=False).hincrby(runs_key, tag, 1).hset(runs_key + ":at", tag, started).execute()
        return {"started": started, "pid": os.getpid(), "tag": tag}
    '''
)


def _savers_available() -> bool:
    out = subprocess.run([sys.executable, "-m", "proxy", "run", "--help"], cwd=support.REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    return "--savers" in out.stdout


SAVERS_AVAILABLE = _savers_available()


def _tail(path: Path, limit: int = 4000) -> str:
    return support._tail(path, limit)


# --------------------------------------------------------------------------------------------
# a default (prefork) worker
# --------------------------------------------------------------------------------------------
class PreforkWorker(support._ChildProcess):
    """``celery -A rmsav worker -c 2 -n <name>@%h --loglevel info`` in a session of its own (so its
    pool processes can be killed with it if a test fails); each start logs to its own file."""

    def __init__(self, name: str, url: str, direct_url: str, workdir: Path, concurrency: int = 2) -> None:
        self.name = name
        self.url = url
        self.direct_url = direct_url
        self.workdir = workdir
        self.appdir = workdir / "app"
        self.concurrency = concurrency
        self.hostname = f"{name}@{socket.gethostname()}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = workdir / "worker-0.log"

    def start(self) -> "PreforkWorker":
        self.appdir.mkdir(parents=True, exist_ok=True)
        (self.appdir / "rmsav.py").write_text(APP)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.appdir) + os.pathsep + env.get("PYTHONPATH", "")
        env["RMSAV_URL"] = self.url
        env["RMSAV_DIRECT_URL"] = self.direct_url
        env["PYTHONUNBUFFERED"] = "1"
        self.starts += 1
        self.log_path = self.workdir / f"worker-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                support._deathsig_prefix()
                + [sys.executable, "-m", "celery", "-A", "rmsav", "worker", "-c", str(self.concurrency),
                   "-n", f"{self.name}@%h", "--loglevel", "info"],
                cwd=self.appdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        support._register(self.proc)
        return self

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("worker-*.log")))

    def wait_ready(self, timeout: float = 40.0) -> float:
        """Seconds until the worker logs ``ready.``."""
        t0 = time.monotonic()
        while "ready." not in self.log_text():
            if not self.is_running() or time.monotonic() - t0 > timeout:
                raise support.ProcessStartError(f"celery worker not ready\n--- {self.log_path} ---\n"
                                                f"{_tail(self.log_path)}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def sigterm(self) -> float:
        """Send SIGTERM (warm shutdown); return the monotonic time it was sent."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return t

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not exit within {timeout}s of SIGTERM\n{_tail(self.log_path)}")
        self._reap_session()
        support._unregister(self.proc)
        return rc

    def stop(self, timeout: float = 30.0) -> float:
        """Warm shutdown; seconds from SIGTERM to exit."""
        t = self.sigterm()
        self.wait_exit(timeout)
        return time.monotonic() - t

    def _reap_session(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes left behind, if any
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        if self.proc is None:
            return
        self._reap_session()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        support._unregister(self.proc)


# --------------------------------------------------------------------------------------------
# one mode: redis-server + proxy (fixed port) + worker + producers
# --------------------------------------------------------------------------------------------
class Stack:
    def __init__(self, mode: str, root: Path) -> None:
        self.mode = mode
        self.root = root
        self.server = support.RedisServer(workdir=root / "redis")
        self.port = support.free_port()  # the clients' port, kept across proxy restarts
        self.state_dir = root / "proxy-state"
        self.saver_args = (["--savers", SAVERS] if mode == "on"
                           else ["--upstream-pool", "2"] if mode == "pool" else [])
        self.proxies: list[support.ProxyProcess] = []
        self.worker: PreforkWorker | None = None
        self._producers: dict[tuple[str, bool], Any] = {}
        self.proxy_stops: list[tuple[float, float, float]] = []  # (SIGTERM, exited, new one ready): wall clock

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def direct_url(self) -> str:
        return f"{self.server.url}/0"

    @property
    def proxy(self) -> support.ProxyProcess:
        return self.proxies[-1]

    def start_proxy(self) -> support.ProxyProcess:
        proxy = support.ProxyProcess(
            self.server,
            ["--listen", f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir), *self.saver_args],
            workdir=self.root / f"proxy-{len(self.proxies) + 1}", log_level=PROXY_LOG_LEVEL,
        )
        self.proxies.append(proxy)
        proxy.start()
        support.wait_for_port("127.0.0.1", self.port, timeout=10)
        return proxy

    def start(self) -> "Stack":
        self.server.start()
        self.start_proxy()
        self.worker = PreforkWorker(self.mode, self.url, self.direct_url, self.root / "worker").start()
        return self

    def restart_proxy(self) -> float:
        """SIGTERM the proxy (graceful), start a new one on the same client port and state dir;
        the seconds the port was closed."""
        t0 = time.monotonic()
        sigterm_at = time.time()
        self.proxy.terminate(timeout=15)
        exited_at = time.time()
        self.start_proxy()
        self.proxy_stops.append((sigterm_at, exited_at, time.time()))
        return time.monotonic() - t0

    def ensure_worker(self) -> PreforkWorker:
        assert self.worker is not None
        if not self.worker.is_running():
            self.worker.start()
        self.worker.wait_ready()
        return self.worker

    def close(self) -> None:
        self.close_producers()
        if self.worker is not None and self.worker.is_running():
            try:
                self.worker.stop(timeout=15)
            except AssertionError:
                pass
        for p in self.proxies:
            if p.is_running():
                try:
                    p.terminate(timeout=10)
                except TimeoutError:
                    pass
        self.server.stop()

    # -- producers ----------------------------------------------------------------------------
    def producer(self, via: str, results: bool = True):
        """A Celery app in this process: broker (and backend when ``results``) through the proxy
        (``via="proxy"``) or straight to the redis-server (``via="direct"``)."""
        from celery import Celery

        key = (via, results)
        if key not in self._producers:
            url = self.url if via == "proxy" else self.direct_url
            self._producers[key] = Celery(f"rmsav-{via}", broker=url, backend=url if results else None)
        return self._producers[key]

    def close_producers(self) -> None:
        for app in self._producers.values():
            try:
                app.close()
            except Exception:
                pass
        self._producers.clear()

    def diagnostics(self) -> str:
        out = [f"=== {self.mode}: worker log {self.worker.log_path if self.worker else None} ==="]
        if self.worker is not None:
            out.append(_tail(self.worker.log_path, 5000))
        for p in self.proxies:
            out.append(f"=== {self.mode}: {p!r} log ===")
            out.append(_tail(p.log_path, 5000))
        return "\n".join(out)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """Both modes' stacks, started together (the ``on`` one only when ``--savers`` exists)."""
    if shutil_which("redis-server") is None:
        pytest.fail("redis-server not found on PATH", pytrace=False)
    modes = ["off", "on", "pool"] if SAVERS_AVAILABLE else ["off", "pool"]
    built: dict[str, Stack] = {}
    try:
        for mode in modes:
            built[mode] = Stack(mode, tmp_path_factory.mktemp(f"savers-{mode}")).start()
        for st in built.values():
            st.worker.wait_ready()
        yield built
    finally:
        for st in built.values():
            st.close()


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def stack_for(stacks: dict[str, Stack], mode: str) -> Stack:
    st = stack_for_skip_only(stacks, mode)
    st.ensure_worker()
    return st


def stack_for_skip_only(stacks: dict[str, Stack], mode: str) -> Stack:
    if mode not in stacks:
        pytest.skip(f"`respmeter run --help` does not list --savers yet (mode {mode!r})")
    return stacks[mode]


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


# --------------------------------------------------------------------------------------------
# exact upstream accounting: proxy metrics vs the server's commandstats
# --------------------------------------------------------------------------------------------
class MonitorLua:
    """``MONITOR`` on the redis-server, keeping the timestamps and names of the commands Lua scripts
    call (``[0 lua]``): INFO commandstats counts those too, but no client sent them."""

    def __init__(self, server: support.RedisServer) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.sock.sendall(support.encode_resp("MONITOR"))
        self.calls: list[tuple[float, list[str]]] = []
        self.last_ts = 0.0
        self._stop = threading.Event()
        self._buf = b""
        first = self._line()
        assert first == b"+OK", first
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self) -> bytes | None:
        while b"\r\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if self._stop.is_set():
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            line = self._line()
            if line is None:
                return
            text = line[1:].decode(errors="replace")
            ts_text, _, rest = text.partition(" ")
            try:
                ts = float(ts_text)
            except ValueError:
                continue
            client, _, args = rest.partition("] ")
            if client.endswith(" lua"):
                words = [w for w in args.split('"') if w.strip()]
                self.calls.append((ts, [w.lower() for w in words[:2]]))
            self.last_ts = ts

    def lua_calls(self, t0: float, t1: float, known: frozenset[str]) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for ts, words in list(self.calls):
            if t0 < ts < t1:
                name = words[0]
                if len(words) > 1 and f"{name}|{words[1]}" in known:
                    name = f"{name}|{words[1]}"
                out[name] += 1
        return out

    def wait_past(self, t: float, timeout: float = 5.0) -> None:
        assert support.eventually(lambda: self.last_ts > t, timeout=timeout), "MONITOR fell behind"

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


class Observer:
    """A direct connection to the redis-server that takes consistent snapshots: the proxy's
    upstream counts, the server's commandstats and which commands are blocked in the server, at an
    instant when nothing ran (the same readings twice in a row)."""

    def __init__(self, server: support.RedisServer) -> None:
        self.client = server.client()
        self.known = support.server_known_commands(self.client)
        self.n_info = 0
        self.n_client_list = 0

    def _read(self) -> dict:
        n_info, n_cl = self.n_info, self.n_client_list
        cs = support.commandstats(self.client)
        self.n_info += 1
        t = time.time()  # after INFO ran: inside the quiet interval when the snapshot is consistent
        clients = self.client.client_list()
        self.n_client_list += 1
        blocked = collections.Counter(c["cmd"] for c in clients if "b" in c.get("flags", ""))
        return {"cs": cs, "t": t, "blocked": blocked, "n_info": n_info, "n_client_list": n_cl}

    @staticmethod
    def _own(cs: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in cs.items() if k not in ("info", "client|list")}

    def snapshot(self, proxy: support.ProxyProcess) -> dict:
        for _ in range(200):
            m1 = upstream_counts(proxy)
            a = self._read()
            m2 = upstream_counts(proxy)
            b = self._read()
            if m1 == m2 and self._own(a["cs"]) == self._own(b["cs"]) and a["blocked"] == b["blocked"]:
                return {**a, "proxy": m1}
            time.sleep(0.03)
        raise AssertionError("no quiet instant for a consistent snapshot in 200 tries")

    def expected_proxy_delta(self, a: dict, b: dict, lua: collections.Counter) -> dict[str, int]:
        """What the proxy must have counted between snapshots ``a`` and ``b``: the server's
        commandstats delta, minus this observer's own INFO / CLIENT LIST, minus what Lua scripts
        called, plus the blocking commands sent but not yet completed at ``b`` (Redis counts a
        blocking command when it returns, the proxy when it sends it), minus those at ``a``."""
        out: dict[str, int] = {}
        for name in set(a["cs"]) | set(b["cs"]) | set(a["blocked"]) | set(b["blocked"]):
            d = b["cs"].get(name, 0) - a["cs"].get(name, 0)
            if name == "info":
                d -= b["n_info"] - a["n_info"]
            elif name == "client|list":
                d -= b["n_client_list"] - a["n_client_list"]
            d -= lua.get(name, 0)
            d += b["blocked"].get(name, 0) - a["blocked"].get(name, 0)
            if d:
                out[name] = d
        return out


def upstream_counts(proxy: support.ProxyProcess) -> dict[str, int]:
    return {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}


class Subscriber:
    """A raw RESP2 SUBSCRIBE connection counting the messages of one channel."""

    def __init__(self, host: str, port: int, channel: str) -> None:
        self.sock = support.RespSocket(host, port)
        reply = self.sock.call("SUBSCRIBE", channel)
        assert reply[0] == b"subscribe", reply
        self.count = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                msg = self.sock.read()
            except socket.timeout:
                continue
            except (OSError, ConnectionError, ValueError):
                return
            if isinstance(msg, list) and msg and msg[0] == b"message":
                self.count += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


HEARTBEAT_CHANNEL = "/0.celeryev/worker.heartbeat"


# --------------------------------------------------------------------------------------------
# 1. the idle window (both modes at once)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def idle_window(stacks):
    """Every stack's worker idle for IDLE_SECONDS, measured at the same time: proxy and server
    snapshots, Lua calls, heartbeats seen by a subscriber through the proxy and one direct."""
    for st in stacks.values():
        st.close_producers()
        st.ensure_worker()
    time.sleep(SETTLE_SECONDS)
    per: dict[str, dict] = {}
    for mode, st in stacks.items():
        per[mode] = {
            "observer": Observer(st.server),
            "monitor": MonitorLua(st.server),
            # through the proxy: a subscriber connected to the server directly would make the events
            # saver forward every heartbeat (the server's receiver count would exceed the proxy's own)
            "sub_proxy": Subscriber("127.0.0.1", st.port, HEARTBEAT_CHANNEL),
        }
    time.sleep(0.5)  # the subscribers' own commands before the window
    for mode, st in stacks.items():
        p = per[mode]
        p["a"] = p["observer"].snapshot(st.proxy)
        p["hb0"] = p["sub_proxy"].count
    time.sleep(IDLE_SECONDS)
    out: dict[str, dict] = {}
    for mode, st in stacks.items():
        p = per[mode]
        p["b"] = p["observer"].snapshot(st.proxy)
        hb = p["sub_proxy"].count - p["hb0"]
        p["observer"].client.ping()  # something after the window, for MONITOR to get past it
        p["monitor"].wait_past(p["b"]["t"])
        a, b = p["a"], p["b"]
        lua = p["monitor"].lua_calls(a["t"], b["t"], p["observer"].known)
        seconds = b["t"] - a["t"]
        out[mode] = {
            "seconds": seconds,
            "proxy": delta(a["proxy"], b["proxy"]),
            "server": {k: v for k, v in support.commandstats_delta(a["cs"], b["cs"]).items()},
            "expected": p["observer"].expected_proxy_delta(a, b, lua),
            "lua": dict(lua),
            "blocked": (dict(a["blocked"]), dict(b["blocked"])),
            "known": p["observer"].known,
            "heartbeats_via_proxy": hb,
            "worker_alive": st.worker.is_running(),
        }
        for key in ("monitor", "sub_proxy"):
            p[key].close()
        print(f"\n[idle {mode}] {seconds:.1f} s: upstream (proxy) {sorted(out[mode]['proxy'].items())}; "
              f"lua {sorted(lua.items())}; blocked {out[mode]['blocked']}; heartbeats via proxy {hb}")
    return out


@pytest.mark.parametrize("mode", MODES)
def test_idle_window_upstream_commands(stacks, idle_window, mode):
    """An idle default worker for ~20 s. The proxy's respmeter_upstream_commands_total equals the
    server's INFO commandstats delta exactly, name by name (after removing what no client sent:
    the observer's own reads and the commands kombu's Lua scripts call, taken from MONITOR, and
    accounting for the BRPOP blocked at each end). Without savers the worker polls about once a
    second and publishes a heartbeat every 2 s; with savers BRPOP upstream is at most 3, PUBLISH
    at most 1 (the 60 s recheck), PING at most 1 (after 30 s without an upstream reply),
    everything at most 10. The heartbeats still reach a subscriber through the proxy in both
    modes."""
    st = stack_for(stacks, mode)
    got = idle_window[mode]
    assert got["worker_alive"], st.diagnostics()
    left_out = support.assert_counts_match(got["proxy"], got["expected"], got["known"])
    assert set(left_out) <= {"client|setinfo", "client|maint_notifications"}, left_out
    up = got["proxy"]
    total = sum(up.values())
    secs = got["seconds"]
    print(f"[idle {mode}] upstream in {secs:.1f} s: {total} ({sorted(up.items())}), "
          f"{total * 86400 / secs:,.0f}/day")
    # a subscriber through the proxy gets the heartbeats (one every 2 s) in both modes
    assert got["heartbeats_via_proxy"] >= int(secs / 2) - 2, got
    if mode in ("off", "pool"):
        assert secs * 0.75 <= up.get("brpop", 0) <= secs * 1.1 + 2, up  # BRPOP timeout 1 s, back to back
        assert secs / 2 - 2 <= up.get("publish", 0) <= secs / 2 + 2, up  # the heartbeat, every 2 s
    else:
        assert up.get("brpop", 0) <= 3, up
        # the events saver sends a watched PUBLISH upstream at least every --saver-recheck (60 s) and
        # after the proxy's own subscriptions change: at most one in a 20 s window
        assert up.get("publish", 0) <= 1, up
        # the ping saver answers PING locally while an upstream reply came within 30 s (PING_ALIVE);
        # an idle worker behind savers gets few replies, so one PING may go up per 30 s
        assert up.get("ping", 0) <= 1, up
        assert total <= 10, up


# --------------------------------------------------------------------------------------------
# 2. pickup latency
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_pickup_latency_p99_within_100ms(stacks, mode):
    """From just before send_task to the task's own start (time.time() in the pool process), for
    a producer through the proxy and one connected directly, one task at a time with random pauses
    (some longer than the worker's 1 s BRPOP, so the poll is in any state): p99 <= 100 ms each."""
    st = stack_for(stacks, mode)
    rng = random.Random(1201)
    lat: dict[str, list[float]] = {"proxy": [], "direct": []}
    for via in lat:  # warm up: connections, pool processes, result subscriptions
        assert st.producer(via).send_task("rmsav.probe", kwargs={"tag": "warm"}).get(timeout=20)["tag"] == "warm"
    order = ["proxy", "direct"] * 20
    rng.shuffle(order)
    for i, via in enumerate(order):
        time.sleep(rng.uniform(1.1, 1.6) if i % 8 == 3 else rng.uniform(0.0, 0.3))
        t0 = time.time()
        res = st.producer(via).send_task("rmsav.probe", kwargs={"tag": f"lat-{i}"})
        out = res.get(timeout=20)
        lat[via].append(out["started"] - t0)
    summary = {via: {"n": len(v), "p50_ms": round(1000 * statistics.median(v), 1),
                     "p99_ms": round(1000 * nearest_rank(v, 0.99), 1), "max_ms": round(1000 * max(v), 1)}
               for via, v in lat.items()}
    print(f"\n[pickup {mode}] {summary}")
    for via, s in summary.items():
        assert s["p99_ms"] <= 100, (via, summary, st.diagnostics())
        assert min(lat[via]) >= -0.005, (via, lat[via])  # same clock: a task cannot start before it is sent


# --------------------------------------------------------------------------------------------
# 3. add_consumer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_add_consumer_new_queue_picked_up_within_1s(stacks, mode):
    """app.control.add_consumer(<new queue>) answers, and tasks sent to that queue start within 1 s
    of being sent: the ones sent right after the answer within 1 s plus 0.1 s of margin (kombu does
    not restart the BRPOP in flight on the old queues, so they wait for its 1 s timeout in both
    modes: measured 0.04-0.8 s), the ones sent after pauses (0.4 s to 2.2 s) within 0.1 s."""
    st = stack_for(stacks, mode)
    queue = f"extra-{mode}-{uuid.uuid4().hex[:8]}"
    ctl = st.producer("proxy")
    replies = ctl.control.add_consumer(queue, reply=True, destination=[st.worker.hostname], timeout=5)
    assert replies and "ok" in replies[0].get(st.worker.hostname, {}), replies
    pickups: list[tuple[str, float, float]] = []
    try:
        for pause, via in ((0.0, "proxy"), (0.0, "direct"), (0.4, "direct"), (1.5, "proxy"), (2.2, "direct")):
            time.sleep(pause)
            t0 = time.time()
            res = st.producer(via).send_task("rmsav.probe", kwargs={"tag": queue}, queue=queue)
            out = res.get(timeout=20)
            pickups.append((via, pause, round(out["started"] - t0, 3)))
        print(f"\n[add_consumer {mode}] pickups (via, pause before, seconds): {pickups}")
        assert all(t <= (1.1 if pause == 0 else 0.1) for _, pause, t in pickups), (pickups, st.diagnostics())
    finally:
        ctl.control.cancel_consumer(queue, reply=True, destination=[st.worker.hostname], timeout=5)


# --------------------------------------------------------------------------------------------
# 4. inspect ping
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_inspect_ping_answers(stacks, mode):
    """`inspect().ping()` through the proxy and directly answers within 1 s (the worker idle for
    more than its BRPOP timeout before each), and the `celery inspect ping` CLI through the proxy
    answers OK and exits 0."""
    st = stack_for(stacks, mode)
    times = []
    for via in ("proxy", "direct", "proxy"):
        time.sleep(1.2)
        insp = st.producer(via).control.inspect(destination=[st.worker.hostname], timeout=3, limit=1)
        t0 = time.monotonic()
        got = insp.ping()
        times.append((via, round(time.monotonic() - t0, 3)))
        assert got == {st.worker.hostname: {"ok": "pong"}}, (via, got, st.diagnostics())
    print(f"\n[inspect ping {mode}] {times}")
    assert all(t <= 1.0 for _, t in times), times
    env = dict(os.environ, RMSAV_URL=st.url, RMSAV_DIRECT_URL=st.direct_url,
               PYTHONPATH=str(st.worker.appdir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = subprocess.run([sys.executable, "-m", "celery", "-A", "rmsav", "inspect", "ping", "-t", "3",
                          "-d", st.worker.hostname], cwd=st.worker.appdir, env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and f"{st.worker.hostname}: OK" in cli.stdout and "pong" in cli.stdout, \
        (cli.returncode, cli.stdout, cli.stderr[-2000:])


# --------------------------------------------------------------------------------------------
# 5. no loss: 1,000 tasks in random bursts, plain / worker restarted twice / proxy restarted
# --------------------------------------------------------------------------------------------
DRAIN_LOSS_ALLOWED = 0  # (the proxy drains: a pop during shutdown is acked, or never sent)
PUBLISH_RETRY = {"max_retries": 60, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.25}


KOMBU_CLOSE_BUG = "Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")"


def run_load(st: Stack, scenario: str, disruptions: list, seed: int, supervise: bool = False) -> dict:
    """Send LOAD_TASKS tasks in random bursts from two producers (through the proxy and direct,
    results not awaited), running each disruption in a thread at evenly spaced points of the run
    while the producers go on more slowly; then wait for the queue to drain and classify every
    task by how many times it ran (HINCRBY straight on the server).

    ``supervise``: a worker that exits by itself is started again, as systemd or Kubernetes would
    (each exit is recorded in ``crashes`` with the reason found in its log)."""
    rng = random.Random(seed)
    runs_key = f"runs:{st.mode}:{scenario}:{uuid.uuid4().hex[:6]}"
    direct = st.server.client()
    ids: dict[str, str] = {}
    via_of: dict[str, str] = {}
    sent_at: dict[str, float] = {}
    send_errors: list[tuple[str, str]] = []
    points = [LOAD_TASKS * (i + 1) // (len(disruptions) + 1) for i in range(len(disruptions))]
    done_d = 0
    thread: threading.Thread | None = None
    errors: list[BaseException] = []
    timings: list[float] = []

    def run_disruption(fn):
        try:
            timings.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    crashes: list[dict] = []
    first_log, first_offset = st.worker.starts, len(st.worker.log_text())

    def check_worker() -> bool:
        if not supervise or st.worker.is_running():
            return False
        text = st.worker.log_text()
        crashes.append({"at": time.time(), "rc": st.worker.proc.poll(), "log": str(st.worker.log_path),
                        "known_kombu_close_bug": KOMBU_CLOSE_BUG in text and "_connparams" in text})
        st.worker.wait_exit(timeout=30)
        st.worker.start()
        st.worker.wait_ready()
        return True

    sent = 0
    t_start = time.monotonic()
    while sent < LOAD_TASKS or (thread is not None and thread.is_alive()):
        check_worker()
        if thread is not None and not thread.is_alive():
            thread.join()
            thread = None
            assert not errors, (errors, st.diagnostics())
        if thread is None and done_d < len(points) and sent >= points[done_d]:
            thread = threading.Thread(target=run_disruption, args=(disruptions[done_d],), daemon=True)
            done_d += 1
            thread.start()
        busy = thread is not None and thread.is_alive()
        # never past the next disruption's point (it starts there, after the running one ended)
        room = (points[done_d] if done_d < len(points) else LOAD_TASKS) - sent
        if room <= 0:
            time.sleep(0.05)
            continue
        burst = min(room, rng.randint(1, 8) if busy else rng.randint(1, 60))
        via = rng.choice(["proxy", "direct"])
        app = st.producer(via, results=False)
        for _ in range(burst):
            tag = f"{sent:04d}"
            task_id = str(uuid.uuid4())
            sent_at[tag] = time.time()
            try:
                app.send_task("rmsav.probe", kwargs={"tag": tag, "runs_key": runs_key}, task_id=task_id,
                              retry=True, retry_policy=PUBLISH_RETRY)
            except Exception as exc:  # noqa: BLE001 - counted
                send_errors.append((tag, repr(exc)))
            ids[tag] = task_id
            via_of[tag] = via
            sent += 1
        time.sleep(rng.uniform(0.05, 0.25) if busy else rng.uniform(0.0, 0.2))
        assert time.monotonic() - t_start < 120, "the load did not finish in 120 s"
    assert not errors, (errors, st.diagnostics())
    t_sent = time.monotonic()

    # drain: until every task ran (or nothing changes for 6 s), then 1.5 s more for late duplicates
    last, last_change = -1, time.monotonic()
    while True:
        if check_worker():
            last_change = time.monotonic()
        ran = direct.hlen(runs_key)
        if ran != last:
            last, last_change = ran, time.monotonic()
        if ran >= LOAD_TASKS or time.monotonic() - last_change > 6:
            break
        time.sleep(0.2)
    t_drained = time.monotonic()
    time.sleep(1.5)
    check_worker()
    runs = {k.decode(): int(v) for k, v in direct.hgetall(runs_key).items()}
    ran_at = {k.decode(): float(v) for k, v in direct.hgetall(runs_key + ":at").items()}
    # what the worker said it was giving back when it lost the broker (kombu restores its unacked
    # messages at channel close; with the broker gone that fails and they stay in `unacked`)
    logs = []
    for i in range(first_log, st.worker.starts + 1):
        path = st.worker.workdir / f"worker-{i}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        logs.append(text[first_offset:] if i == first_log else text)
    restoring = [int(n) for n in re.findall(r"Restoring (\d+) unacknowledged message", "".join(logs))]

    # where the tasks that never ran are: still queued, or parked in kombu's `unacked` hash (kombu
    # gives those back only after the visibility timeout, 1 h by default), or nowhere (lost)
    queued_ids: set[str] = set()
    for key in direct.scan_iter(match="celery*", count=1000):
        if direct.type(key) == b"list":
            for raw in direct.lrange(key, 0, -1):
                queued_ids.add(json.loads(raw)["headers"]["id"])
    parked_ids = set()
    for raw in direct.hvals("unacked"):
        parked_ids.add(json.loads(raw)[0]["headers"]["id"])
    tag_of = {v: k for k, v in ids.items()}
    never = sorted(t for t in ids if runs.get(t, 0) == 0)
    dup = {t: (n, via_of[t], ids[t], sent_at[t]) for t, n in runs.items() if n > 1}
    queued = sorted(t for t in never if ids[t] in queued_ids)
    parked = sorted(t for t in never if ids[t] in parked_ids)
    lost = sorted(set(never) - set(queued) - set(parked))
    ran_but_parked = sorted(tag_of[i] for i in parked_ids if i in tag_of and runs.get(tag_of[i], 0) > 0)

    # results: every task that ran stored SUCCESS through the backend (the worker's is the proxy)
    keys = [f"celery-task-meta-{ids[t]}" for t in sorted(runs)]
    metas = []
    for i in range(0, len(keys), 500):
        metas += direct.mget(keys[i:i + 500])
    no_result = [t for t, m in zip(sorted(runs), metas) if m is None or json.loads(m)["status"] != "SUCCESS"]
    out = {
        "sent_at_parked": {t: sent_at[t] for t in parked + ran_but_parked},
        "sent": len(ids), "send_errors": len(send_errors), "ran_once": sum(1 for n in runs.values() if n == 1),
        "duplicates": dup, "never_ran": len(never), "still_queued": queued, "parked_in_unacked": parked,
        "lost": {t: (via_of[t], ids[t], sent_at[t]) for t in lost},
        "ran_but_still_in_unacked": {t: (via_of[t], ids[t], sent_at[t]) for t in ran_but_parked}, "missing_results": no_result[:20],
        "missing_results_n": len(no_result), "missing_results_ran_at": {t: ran_at.get(t) for t in no_result},
        "crashes": crashes, "restoring_logged": restoring, "disruption_seconds": [round(t, 2) for t in timings],
        "send_seconds": round(t_sent - t_start, 1), "drain_seconds": round(t_drained - t_sent, 1),
    }
    print(f"\n[no-loss {st.mode} {scenario}] {out}" + (f" send errors: {send_errors[:5]}" if send_errors else ""))
    return out


def ids_sent_before(out: dict, tag: str) -> float:
    return out["sent_at_parked"][tag]


def assert_exactly_once(st: Stack, out: dict, allowed_drain: int = 0, allowed_unacked: int = 0,
                        excused_results: frozenset[str] = frozenset()) -> None:
    """Every task sent ran exactly once and stored its result; nothing duplicated, nothing left in
    the queue or in `unacked`. The exceptions, whose reasons the caller checked: at most
    ``allowed_drain`` are lost (never ran, nowhere) or ran twice; at most ``allowed_unacked`` wait
    in `unacked` (kombu gives them back after its visibility timeout, 1 h: the ones that never ran
    run late, the ones that ran run again); the results of ``excused_results`` may be missing."""
    assert out["sent"] == LOAD_TASKS and out["send_errors"] == 0, out
    assert not out["still_queued"], out
    assert len(out["parked_in_unacked"]) + len(out["ran_but_still_in_unacked"]) <= allowed_unacked, out
    assert len(out["lost"]) + len(out["duplicates"]) <= allowed_drain, (out, st.diagnostics())
    never = len(out["lost"]) + len(out["parked_in_unacked"])
    assert out["ran_once"] == LOAD_TASKS - never - len(out["duplicates"]), (out, st.diagnostics())
    assert set(out["missing_results_ran_at"]) <= excused_results, out


@pytest.mark.parametrize("mode", MODES)
def test_no_loss_1000_tasks_in_bursts(stacks, mode):
    """1,000 tasks in random bursts from both producers: each runs exactly once, and each has its
    SUCCESS result in the backend."""
    st = stack_for(stacks, mode)
    out = run_load(st, "plain", [], seed=1205)
    assert_exactly_once(st, out)
    assert out["drain_seconds"] <= 30, out


@pytest.mark.parametrize("mode", MODES)
def test_no_loss_with_the_worker_restarted_twice(stacks, mode):
    """The same while the worker is stopped with SIGTERM (warm shutdown) and started again, twice.
    With the default early acknowledgement a task is acked when a pool process starts it; a warm
    shutdown lets the started ones finish and kombu gives the prefetched, unstarted ones back to
    the queue (restore at shutdown). So every task runs exactly once: no duplicate, none lost, none
    left parked in `unacked`."""
    st = stack_for(stacks, mode)

    def restart() -> float:
        t0 = time.monotonic()
        st.worker.stop(timeout=30)
        st.worker.start()
        st.worker.wait_ready()
        return time.monotonic() - t0

    out = run_load(st, "worker-restarts", [restart, restart], seed=1206)
    assert st.worker.starts >= 3
    assert "Traceback" not in st.worker.all_logs(), st.diagnostics()
    assert_exactly_once(st, out)


@pytest.mark.parametrize("mode", MODES)
def test_no_loss_with_the_proxy_restarted(stacks, mode):
    """The same while the proxy is stopped with SIGTERM (graceful) and a new one started on the
    same port and state dir. The producer through the proxy retries its publishes (kombu's publish
    retry, a longer policy than the default); the worker reconnects by itself. Every task runs
    exactly once with its result stored, but for three known effects of a broker connection loss,
    each allowed only as far as measured and explained (all seen in both modes, 2026-12):

    1. The drain (the proxy's; most runs): the task published just as the proxy gets SIGTERM is
       lost. The proxy still forwards its LPUSH and the worker's BRPOP reply that pops it, then
       resets the worker's connection before kombu's `MULTI ZADD unacked_index HSET unacked EXEC`
       that records it; it lived only in the worker's memory, which the reconnect clears (worker
       log: the traceback through kombu `_brpop_read` -> `QoS.append`). Allowed: at most
       DRAIN_LOSS_ALLOWED task(s) lost or run twice, sent between 1 s before the SIGTERM and the
       proxy's exit. Set it to 0 once the graceful shutdown no longer pops for clients it then
       cuts off.
    2. kombu's Redis transport, on any connection loss (some runs): the messages the worker held
       unacked (running, whose early ack fails: "Couldn't ack"; and prefetched) are given back at
       channel close ("Restoring N unacknowledged message(s)"), which fails with the broker gone:
       they wait in `unacked` for the visibility timeout (1 h), then the ones that ran run again.
       Allowed: at most the N the worker logged, sent within 5 s before the SIGTERM.
    3. kombu 5.7 (about one run in five): the worker exits on the connection loss, "Unrecoverable
       error: AttributeError('NoneType' object has no attribute 'hostname')" from `Channel.close`
       -> `restore_unacked_once` -> `_connparams`. The test starts it again, as a supervisor
       would. A task finishing in the pool meanwhile may miss its result (celery's default
       result_backend_always_retry=False): allowed for tasks that ran between 1 s before the
       SIGTERM and 3 s after the new proxy was ready."""
    st = stack_for(stacks, mode)
    n_before = len(st.proxies)
    out = run_load(st, "proxy-restart", [st.restart_proxy], seed=1207, supervise=True)
    assert len(st.proxies) == n_before + 1
    assert out["disruption_seconds"] and out["disruption_seconds"][0] <= 15, out
    old = st.proxies[-2]
    assert old.returncode == 0, (old.returncode, _tail(old.log_path))
    for p in st.proxies[-2:]:
        assert "Traceback" not in p.log_text(), _tail(p.log_path)
    assert st.worker.is_running(), st.diagnostics()
    sigterm_at, exited_at, ready_at = st.proxy_stops[-1]
    drained = {**out["lost"], **{t: v[1:] for t, v in out["duplicates"].items()}}
    outside = {t: v for t, v in drained.items() if not sigterm_at - 1.0 <= v[2] <= exited_at}
    assert not outside, ("lost / run twice outside the proxy's drain", outside, (sigterm_at, exited_at), out)
    if drained:
        print(f"[no-loss {mode} proxy-restart] KNOWN drain victims: lost {out['lost']}, ran twice "
              f"{out['duplicates']} (SIGTERM at {sigterm_at:.3f}, proxy exited at {exited_at:.3f})")
    parked = {**out["ran_but_still_in_unacked"], **{t: None for t in out["parked_in_unacked"]}}
    if parked:
        print(f"[no-loss {mode} proxy-restart] KNOWN left in unacked on the connection loss: never ran "
              f"{out['parked_in_unacked']}, ran (will run again) {sorted(out['ran_but_still_in_unacked'])}; "
              f"worker logged restoring {out['restoring_logged']}")
    early = [t for t in parked if ids_sent_before(out, t) < sigterm_at - 5.0]
    assert not early, ("left in unacked but sent long before the SIGTERM", early, out)
    assert len(out["crashes"]) <= 1 and all(c["known_kombu_close_bug"] for c in out["crashes"]), out["crashes"]
    if out["crashes"]:
        print(f"[no-loss {mode} proxy-restart] KNOWN kombu crash on the connection loss: {out['crashes']}")
    excused = frozenset(t for t, at in out["missing_results_ran_at"].items()
                        if at is not None and sigterm_at - 1.0 <= at <= ready_at + 3.0)
    assert_exactly_once(st, out, allowed_drain=DRAIN_LOSS_ALLOWED,
                        allowed_unacked=max(out["restoring_logged"], default=0), excused_results=excused)


# --------------------------------------------------------------------------------------------
# 6. SIGTERM (both modes at once; last: it stops the workers)
# --------------------------------------------------------------------------------------------
SIGTERM_BOUND_OFF = 5.0  # measured 1.6-2.2 s for this default prefork worker without savers


@pytest.fixture(scope="module")
def sigterm_times(stacks):
    """Every stack's worker idle for 3.5 s (beyond its 1 s BRPOP), then SIGTERMed at the same
    instant: seconds from the signal to the worker's exit (it waits for its pool processes)."""
    for st in stacks.values():
        st.close_producers()
        st.ensure_worker()
    time.sleep(3.5)
    sent = {mode: st.worker.sigterm() for mode, st in stacks.items()}
    exited: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(exited) < len(stacks) and time.monotonic() < deadline:
        for mode, st in stacks.items():
            if mode not in exited and st.worker.proc.poll() is not None:
                exited[mode] = time.monotonic() - sent[mode]
        time.sleep(0.01)
    out = {}
    for mode, st in stacks.items():
        rc = st.worker.wait_exit(timeout=1)
        out[mode] = {"seconds": round(exited.get(mode, math.inf), 2), "rc": rc,
                     "warm": "Warm shutdown" in st.worker.log_text()}
    print(f"\n[sigterm] {out}")
    return out


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_exits_as_fast_as_without_savers(stacks, sigterm_times, mode):
    """An idle worker SIGTERMed exits (warm shutdown, status 0) within a fixed bound without savers
    (5 s; measured about 2 s), and with savers within 1 s of the worker without savers SIGTERMed at
    the same instant. And over the whole module kombu's BRPOP watchdog never fired (it drops a
    connection whose BRPOP got no reply for 26 s: what stretching the BRPOP timeout upstream does)."""
    st = stack_for_skip_only(stacks, mode)
    logs = st.worker.all_logs()
    assert "dropping stale connection" not in logs and "got no reply for" not in logs, st.diagnostics()
    got = sigterm_times[mode]
    assert got["rc"] == 0 and got["warm"], (got, stacks[mode].diagnostics())
    off = sigterm_times["off"]["seconds"]
    assert off <= SIGTERM_BOUND_OFF, sigterm_times
    if mode == "on":
        assert got["seconds"] <= off + 1.0, sigterm_times
