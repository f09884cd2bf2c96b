"""Child processes for the benchmark and the redis-py suite runner: started on free loopback ports,
each in its own session, and always stopped (on exit, Ctrl-C or SIGTERM)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

FORBIDDEN_PORTS = {6379}  # the machine's own Redis: never started on, never connected to


class Procs:
    """Every child a script starts; ``stop_all`` stops them in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:  # noqa: ANN003
        with open(log, "wb") as fh:
            # own session: a terminal Ctrl-C reaches only the script, which stops the children
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)

    def cleanup(self, work: Path, keep: bool) -> None:
        """Stop every child (a second Ctrl-C must not cut this short), then remove ``work``."""
        import shutil
        import signal

        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, old_int)
        if keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port
    raise RuntimeError("no free loopback port")


def wait_ping(port: int, proc: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 15.0) -> None:
    """Until PING on 127.0.0.1:port answers +PONG (bounded); the log's tail if the process died."""
    assert port not in FORBIDDEN_PORTS
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                data = s.recv(64)
                if data.startswith(b"+PONG"):
                    return
                last = data.decode(errors="replace").strip()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{what} on port {port} not ready after {timeout:g}s ({last})")


def ready(procs: Procs, p: subprocess.Popen, port: int, what: str, log: Path) -> None:
    """wait_ping, stopping the process if it never becomes ready."""
    try:
        wait_ping(port, p, what, log)
    except BaseException:
        procs.stop(p)
        raise


def start_proxy(procs: Procs, work: Path, python: str, redis_port: int, extra: list[str], proxy_dir: Path,
                tag: str = "") -> tuple[int, int, subprocess.Popen]:
    """respmeter from ``proxy_dir`` in front of 127.0.0.1:redis_port: (port, admin port, process).
    Its usage state goes to ``work``, not to ~/.local/state/respmeter."""
    port, admin = free_port(), free_port()
    log = work / f"proxy{'-' + tag if tag else ''}-{port}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(proxy_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RESPMETER_STATE_DIR"] = str(work / f"proxy-state{'-' + tag if tag else ''}")
    env["XDG_STATE_HOME"] = str(work / "xdg-state")
    p = procs.start([python, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}",
                     "--upstream", f"redis://127.0.0.1:{redis_port}", "--admin", f"127.0.0.1:{admin}",
                     "--log-level", "warning", *extra], log, cwd=str(proxy_dir), env=env)
    ready(procs, p, port, "proxy", log)
    return port, admin, p
