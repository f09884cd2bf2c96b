"""Helpers for tests that drive *real* components over loopback sockets.

Everything here is importable by tests (``from tests.support import ...`` or,
because pytest puts ``tests/`` on ``sys.path`` via rootdir conftest,
``from support import ...``).  The pytest fixtures that wrap these helpers
live in ``tests/conftest.py``.

Contents
--------
* :func:`free_port` -- pick an unused loopback TCP port.
* :class:`TLSMaterial` / :func:`make_tls_material` -- throw-away CA, server
  and client certificates generated with the ``openssl`` CLI.
* :class:`RedisServer` -- a real ``redis-server`` child process (plain or TLS).
* :class:`ProxyProcess` -- the proxy under test (``python -m proxy run ...``)
  as a real child process with its output captured to a log file.
* :func:`commandstats` / :func:`commandstats_delta` -- ``INFO commandstats``
  as ``{command: calls + rejected_calls}``.
* :func:`server_known_commands` / :func:`assert_counts_match` -- the commands a
  server knows, and the proxy's per-command count compared with a
  commandstats delta for exactly those.
* :func:`parse_metrics` / :func:`metric_sum` -- Prometheus text exposition
  parsed into flat samples.

Every child process started through these helpers is recorded in a module
registry and SIGKILLed by an ``atexit`` hook (and by ``kill_all_children``,
which ``conftest.py`` calls at session end), so nothing outlives the test run.
When started from the main thread the children additionally get a
parent-death signal (``setpriv --pdeathsig KILL``) so they die even if pytest
itself is SIGKILLed.
"""

from __future__ import annotations

import atexit
import dataclasses
import http.client
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``redis-server`` binary to use (override with ``$REDIS_SERVER``).
REDIS_SERVER_BIN = os.environ.get("REDIS_SERVER", "redis-server")
#: ``openssl`` binary to use (override with ``$OPENSSL``).
OPENSSL_BIN = os.environ.get("OPENSSL", "openssl")

__all__ = [
    "REPO_ROOT",
    "rss_kb",
    "ProcessStartError",
    "free_port",
    "wait_for_port",
    "TLSMaterial",
    "make_tls_material",
    "RedisServer",
    "ProxyProcess",
    "MetricSample",
    "parse_metrics",
    "metric_sum",
    "commandstats",
    "parse_commandstats",
    "commandstats_delta",
    "server_known_commands",
    "assert_counts_match",
    "kill_all_children",
    "RespError",
    "RespPush",
    "RespSocket",
    "encode_resp",
]


class ProcessStartError(RuntimeError):
    """A helper process exited early or did not become ready in time.

    The message contains the tail of the process log.
    """


# --------------------------------------------------------------------------
# child-process registry (session-wide guard)
# --------------------------------------------------------------------------

_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


def _register(proc: subprocess.Popen) -> None:
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc


def _unregister(proc: subprocess.Popen) -> None:
    with _CHILDREN_LOCK:
        _CHILDREN.pop(proc.pid, None)


def kill_all_children() -> list[int]:
    """SIGKILL and reap every helper process still running; return their pids."""
    with _CHILDREN_LOCK:
        procs = list(_CHILDREN.values())
        _CHILDREN.clear()
    killed = []
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
            killed.append(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - should not happen
            pass
    return killed


atexit.register(kill_all_children)


def _deathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when usable, else ``[]``.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it
    is only used for children started from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _tail(path: Path | None, limit: int = 6000) -> str:
    if path is None:
        return "<no log>"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log unreadable: {exc}>"
    if len(text) > limit:
        text = "...[truncated]...\n" + text[-limit:]
    return text


# --------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------

_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


# The session runs its proxies on the upstream pool when RESPMETER_UPSTREAM_POOL=N is set (each proxy
# inherits it): what the pool answers itself (PING, the handshake) then has outcome "local" and never
# goes upstream, and each shared connection sends its own handshake (client "respmeter").
POOLED = os.environ.get("RESPMETER_UPSTREAM_POOL", "0").strip() not in ("", "0")


def rss_kb(pid: int) -> int:
    """A process's resident memory now, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently unused TCP port on ``host``.

    Uses ``bind((host, 0))``.  The port is released before returning, so a
    race with another process is possible: callers retry on EADDRINUSE
    (:class:`RedisServer` and :class:`ProxyProcess` do).  Ports already handed
    out by this process are never returned twice.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _PORT_LOCK:
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError("could not find a free port")


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def eventually(check, timeout: float = 5.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Call ``check`` until it returns a true value (returned) or ``timeout`` passes (then its last
    false value is returned, for the caller's assert to show)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait until ``host:port`` accepts TCP connections or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_is_open(host, port):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s")


def _looks_like_addr_in_use(text: str) -> bool:
    low = text.lower()
    return "address already in use" in low or "eaddrinuse" in low or "errno 98" in low


# --------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLSMaterial:
    """Paths of PEM files generated by :func:`make_tls_material`.

    * ``ca_cert`` / ``ca_key`` -- the test CA (signs everything below).
    * ``server_cert`` / ``server_key`` -- SAN ``IP:127.0.0.1, DNS:localhost``.
    * ``client_cert`` / ``client_key`` -- clientAuth cert signed by the CA.
    * ``wrong_ca_cert`` / ``wrong_ca_key`` -- an unrelated CA.
    * ``wrong_client_cert`` / ``wrong_client_key`` -- client cert signed by
      the *wrong* CA (rejected by a server trusting ``ca_cert``).
    * ``mismatch_server_cert`` / ``mismatch_server_key`` -- signed by the
      good CA but SAN is only ``DNS:mismatch.invalid`` (no 127.0.0.1 /
      localhost): hostname verification must fail.
    """

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_cert: Path
    wrong_ca_key: Path
    wrong_client_cert: Path
    wrong_client_key: Path
    mismatch_server_cert: Path
    mismatch_server_key: Path

    #: SAN of ``mismatch_server_cert``.
    MISMATCH_HOSTNAME = "mismatch.invalid"


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(
        [OPENSSL_BIN, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=30,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"openssl {' '.join(args)} failed ({res.returncode}):\n"
            + res.stdout.decode(errors="replace")
        )


def _ec_key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=path.parent)
    path.chmod(0o600)


def _make_ca(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _ec_key(key)
    _openssl(
        "req", "-x509", "-new", "-sha256", "-days", "3650",
        "-key", str(key), "-out", str(cert), "-subj", f"/O=respmeter tests/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    return cert, key


def _make_leaf(
    d: Path, name: str, cn: str, ca: tuple[Path, Path], *, eku: str, san: str | None
) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    _ec_key(key)
    _openssl("req", "-new", "-sha256", "-key", str(key), "-out", str(csr),
             "-subj", f"/O=respmeter tests/CN={cn}", cwd=d)
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyAgreement",
        f"extendedKeyUsage={eku}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    ca_cert, ca_key = ca
    _openssl(
        "x509", "-req", "-sha256", "-days", "825",
        "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-set_serial", "0x" + secrets.token_hex(16),
        "-extfile", str(ext), "-out", str(cert),
        cwd=d,
    )
    csr.unlink()
    ext.unlink()
    return cert, key


def make_tls_material(directory: str | os.PathLike[str]) -> TLSMaterial:
    """Generate a complete set of test certificates into ``directory``.

    Uses only the ``openssl`` CLI (no network), EC prime256v1 keys; takes well
    under a second.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(d, "ca", "respmeter test CA")
    wrong_ca = _make_ca(d, "wrong-ca", "respmeter WRONG test CA")
    server = _make_leaf(d, "server", "localhost", ca, eku="serverAuth",
                        san="IP:127.0.0.1,DNS:localhost")
    client = _make_leaf(d, "client", "respmeter-test-client", ca, eku="clientAuth", san=None)
    wrong_client = _make_leaf(d, "wrong-client", "respmeter-wrong-client", wrong_ca,
                              eku="clientAuth", san=None)
    mismatch = _make_leaf(d, "mismatch-server", TLSMaterial.MISMATCH_HOSTNAME, ca,
                          eku="serverAuth", san=f"DNS:{TLSMaterial.MISMATCH_HOSTNAME}")
    return TLSMaterial(
        dir=d,
        ca_cert=ca[0], ca_key=ca[1],
        server_cert=server[0], server_key=server[1],
        client_cert=client[0], client_key=client[1],
        wrong_ca_cert=wrong_ca[0], wrong_ca_key=wrong_ca[1],
        wrong_client_cert=wrong_client[0], wrong_client_key=wrong_client[1],
        mismatch_server_cert=mismatch[0], mismatch_server_key=mismatch[1],
    )


# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------


def _no_retry():
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


class _ChildProcess:
    """What RedisServer and ProxyProcess share about their child process (``proc``, ``log_path``)."""

    proc: subprocess.Popen | None
    log_path: Path

    def _close_clients(self) -> None:  # overridden by classes that hand out clients
        pass

    def kill(self) -> int | None:
        """SIGKILL and reap (a crash); return the exit code (``-9``). It can be started again."""
        self._close_clients()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        _unregister(self.proc)
        return self.proc.returncode

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to its log so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class RedisServer(_ChildProcess):
    """A real ``redis-server`` bound to 127.0.0.1 on a free port.

    Parameters
    ----------
    extra_args:
        Extra command-line config, passed verbatim after the defaults, e.g.
        ``["--user", "alice", "on", ">pw", "~*", "+@all"]`` or
        ``["--maxclients", "50"]``.  Later options override earlier ones.
    password:
        Sets ``--requirepass`` and is used by :meth:`client` by default.
    username:
        Used (with ``password``) by :meth:`client` by default, e.g. for an ACL
        user created through ``extra_args``.  Does not create the user.
    tls:
        A :class:`TLSMaterial`; when given, the server listens with TLS only
        (``--port 0 --tls-port P``).
    tls_auth_clients:
        ``"no"`` / ``"yes"`` / ``"optional"`` (``--tls-auth-clients``).
    server_cert, server_key:
        Override the certificate the TLS server presents (default
        ``tls.server_cert`` / ``tls.server_key``), e.g. the mismatch cert.
    workdir:
        Directory for ``dir`` and the log; a private temp dir (removed on
        :meth:`stop`) when omitted.

    The process is started by :meth:`start` (or by using the object as a
    context manager).  It is considered ready once it answers ``PING`` with any
    RESP reply (``+PONG`` or an error such as ``-NOAUTH``).
    """

    START_TIMEOUT = 10.0

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        password: str | None = None,
        username: str | None = None,
        tls: TLSMaterial | None = None,
        tls_auth_clients: str = "no",
        server_cert: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        if tls_auth_clients not in ("no", "yes", "optional"):
            raise ValueError(f"tls_auth_clients must be no/yes/optional, not {tls_auth_clients!r}")
        if (server_cert or server_key) and tls is None:
            raise ValueError("server_cert/server_key need tls=")
        self.extra_args = [str(a) for a in extra_args]
        self.password = password
        self.username = username
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.server_cert = Path(server_cert) if server_cert else (tls.server_cert if tls else None)
        self.server_key = Path(server_key) if server_key else (tls.server_key if tls else None)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="respmeter-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.host = "127.0.0.1"
        self.port: int = 0
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self._clients: list[Any] = []

    # -- info ---------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P`` or ``rediss://127.0.0.1:P`` (no credentials)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def url_with_auth(self, username: str | None = None, password: str | None = None) -> str:
        """:attr:`url` with ``user:password@`` (defaults: the server's own)."""
        from urllib.parse import quote

        username = username if username is not None else self.username
        password = password if password is not None else self.password
        if not username and not password:
            return self.url
        cred = quote(username or "", safe="")
        if password:
            cred += ":" + quote(password, safe="")
        return f"{self.scheme}://{cred}@{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url} pid={self.pid} {state}>"

    # -- client side --------------------------------------------------------

    def ssl_kwargs(self, *, client_cert: bool = True) -> dict[str, Any]:
        """redis-py TLS kwargs that verify this server against the test CA.

        Includes the test client certificate when ``client_cert`` is true
        (harmless when the server does not ask for one).
        """
        if not self.tls:
            return {}
        kw: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_certs": str(self.tls.ca_cert),
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }
        if client_cert:
            kw["ssl_certfile"] = str(self.tls.client_cert)
            kw["ssl_keyfile"] = str(self.tls.client_key)
        return kw

    def client(self, **kw: Any):
        """A ``redis.Redis`` connected DIRECTLY to this server (not via a proxy).

        Defaults: this server's host/port, its username/password, TLS options
        from :meth:`ssl_kwargs`, ``socket_timeout=10`` and NO retries (redis-py
        8 otherwise retries connection errors 3x with backoff, which makes
        failure tests slow and can repeat commands).  Any keyword overrides
        a default (pass ``ssl_certfile=None, ssl_keyfile=None`` to connect
        without a client certificate).  Clients are closed on :meth:`stop`.
        """
        import redis

        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry": _no_retry(),
        }
        if self.password is not None:
            params["password"] = self.password
        if self.username is not None:
            params["username"] = self.username
        params.update(self.ssl_kwargs())
        params.update(kw)
        c = redis.Redis(**params)
        self._clients.append(c)
        return c

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        ctx.check_hostname = False  # readiness only; may be the mismatch cert
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def _raw_ping(self, timeout: float = 1.0) -> bytes | None:
        """Send PING on a fresh (TLS if needed) connection; return first reply line."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError:
            return None
        try:
            ctx = self._ssl_context()
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=self.host)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            buf = b""
            while b"\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                buf += chunk
            return buf.split(b"\r\n", 1)[0]
        except (OSError, ssl.SSLError):
            return None
        finally:
            try:
                sock.close()
            except OSError:
                pass

    # -- lifecycle ------------------------------------------------------------

    def _build_argv(self, port: int) -> list[str]:
        argv = [
            REDIS_SERVER_BIN,
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
        ]
        if self.tls:
            argv += [
                "--port", "0",
                "--tls-port", str(port),
                "--tls-cert-file", str(self.server_cert),
                "--tls-key-file", str(self.server_key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", self.tls_auth_clients,
            ]
        else:
            argv += ["--port", str(port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        argv += self.extra_args
        return argv

    def start(self) -> "RedisServer":
        if self.is_running():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_err = ""
        for _attempt in range(5):
            port = free_port(self.host)
            self.argv = self._build_argv(port)
            try:
                self.log_path.unlink()
            except FileNotFoundError:
                pass
            with open(self.workdir / "redis.stdout", "ab") as out:
                self.proc = subprocess.Popen(
                    _deathsig_prefix() + self.argv,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            _register(self.proc)
            self.port = port
            deadline = time.monotonic() + self.START_TIMEOUT
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    _unregister(self.proc)
                    last_err = self._diagnostics()
                    if _looks_like_addr_in_use(last_err):
                        break  # port race: retry with a new port
                    raise ProcessStartError(
                        f"redis-server exited with {rc} during startup\n"
                        f"argv: {self.argv}\n{last_err}"
                    )
                reply = self._raw_ping()
                if reply and reply[:1] in (b"+", b"-"):
                    return self
                if time.monotonic() > deadline:
                    diag = self._diagnostics()
                    self.kill()
                    raise ProcessStartError(
                        f"redis-server not ready after {self.START_TIMEOUT}s\n"
                        f"argv: {self.argv}\n{diag}"
                    )
                time.sleep(0.02)
        raise ProcessStartError(f"redis-server: could not bind a free port\n{last_err}")

    def _diagnostics(self) -> str:
        stdout = self.workdir / "redis.stdout"
        return f"--- redis.log ---\n{_tail(self.log_path)}\n--- stdout ---\n{_tail(stdout)}"

    def _close_clients(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the exit code."""
        self._close_clients()
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.terminate()
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            rc = self.proc.returncode
            _unregister(self.proc)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return rc


    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Prometheus metrics
# --------------------------------------------------------------------------


class MetricSample(NamedTuple):
    """One sample of a scrape.

    ``name`` is the *sample* name: counters appear as ``<family>_total`` (and
    ``<family>_created``), histograms as ``_bucket`` / ``_sum`` / ``_count``.
    ``family`` and ``type`` come from the metric family.
    """

    name: str
    labels: dict[str, str]
    value: float
    family: str
    type: str


def parse_metrics(text: str) -> list[MetricSample]:
    """Parse Prometheus text exposition into a flat list of samples."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[MetricSample] = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append(MetricSample(s.name, dict(s.labels), float(s.value), fam.name, fam.type))
    return out


def metric_sum(
    samples: Iterable[MetricSample],
    name: str,
    /,
    by: Sequence[str] = ("command",),
    **label_filters: str,
) -> dict[Any, float]:
    """Sum samples called exactly ``name`` grouped by the labels in ``by``.

    Only samples whose labels equal every ``label_filters`` item are used.
    Keys are the label value when ``by`` has one label (``{"get": 3.0}``), a
    tuple of values for several labels, and ``()`` for ``by=()`` (grand
    total).  A sample missing a ``by`` label is grouped under ``None`` for it.
    """
    by = tuple(by)
    out: dict[Any, float] = {}
    for s in samples:
        if s.name != name:
            continue
        if any(s.labels.get(k) != str(v) for k, v in label_filters.items()):
            continue
        vals = tuple(s.labels.get(b) for b in by)
        key: Any = vals[0] if len(by) == 1 else vals
        out[key] = out.get(key, 0.0) + s.value
    return out


# --------------------------------------------------------------------------
# the proxy under test
# --------------------------------------------------------------------------


class ProxyProcess(_ChildProcess):
    """The proxy started as a real subprocess.

    Command line::

        [*command, "run", "--listen", "127.0.0.1:<free>", "--upstream", <url>,
         "--admin", "127.0.0.1:<free>", "--log-level", "debug", *extra_args]

    where ``command`` defaults to ``[sys.executable, "-m", "proxy"]``, run with
    ``cwd`` = the repo root, the parent's environment plus ``env`` (and
    ``PYTHONUNBUFFERED=1``), stdout+stderr appended to ``<workdir>/proxy.log``.

    Ready when the listen port accepts a TCP connection AND ``GET /healthz``
    on the admin port answers with any HTTP status.  If the process exits
    first, or is not ready in ``ready_timeout`` seconds, :meth:`start` raises
    :class:`ProcessStartError` including the captured log.  An early exit whose
    log mentions "Address already in use" is retried on fresh ports.

    ``upstream`` may be a URL string or a :class:`RedisServer` (its ``.url``).
    ``upstream=None`` omits ``--upstream`` entirely.
    """

    def __init__(
        self,
        upstream: "str | RedisServer | None",
        extra_args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        command: Sequence[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_level: str | None = "debug",
        ready_timeout: float = 15.0,
    ) -> None:
        self.upstream = upstream.url if isinstance(upstream, RedisServer) else upstream
        self.extra_args = [str(a) for a in extra_args]
        self.env = dict(env or {})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="respmeter-proxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "proxy.log"
        self.command = list(command) if command else [sys.executable, "-m", "proxy"]
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self._clients: list[Any] = []
        self._exited_early = False

    # -- info -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited({self.returncode})"
        return f"<ProxyProcess {self.url} admin={self.admin_url} pid={self.pid} {state}>"

    # -- lifecycle --------------------------------------------------------------

    def _build_argv(self) -> list[str]:
        argv = [*self.command, "run", "--listen", f"{self.host}:{self.port}"]
        if self.upstream is not None:
            argv += ["--upstream", self.upstream]
        argv += ["--admin", f"{self.host}:{self.admin_port}"]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        own = ("--state-dir", "--config")  # a config file may name its own state_dir
        if not any(a.split("=", 1)[0] in own for a in self.extra_args) and not (
            {"RESPMETER_STATE_DIR", "RESPMETER_CONFIG"} & set(self.env)
        ):
            # never the user's state directory: each proxy keeps its usage in its own workdir
            argv += ["--state-dir", str(self.workdir / "state")]
        return argv + self.extra_args

    def start(self) -> "ProxyProcess":
        if self.is_running():
            return self
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        for _attempt in range(4):
            self.port = free_port(self.host)
            self.admin_port = free_port(self.host)
            self.argv = self._build_argv()
            # NB: nothing but the proxy's own output goes into the log (tests
            # scan it for leaked secrets; argv may contain credentials).
            log = open(self.log_path, "ab")
            log_start = log.tell()
            try:
                self.proc = subprocess.Popen(
                    _deathsig_prefix() + self.argv,
                    cwd=self.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            finally:
                log.close()
            _register(self.proc)
            try:
                self._wait_ready()
                return self
            except ProcessStartError:
                if self._exited_early:
                    with open(self.log_path, "rb") as f:
                        f.seek(log_start)
                        this_run = f.read().decode(errors="replace")
                    if _attempt < 3 and _looks_like_addr_in_use(this_run):
                        _unregister(self.proc)
                        continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _healthz_raw(self, timeout: float) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.admin_port, timeout=timeout)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        listening = False
        self._exited_early = False
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._exited_early = True
                _unregister(self.proc)
                raise ProcessStartError(
                    f"proxy exited with {rc} during startup\nargv: {self.argv}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            if not listening:
                listening = port_is_open(self.host, self.port, timeout=0.5)
            if listening:
                try:
                    self._healthz_raw(timeout=1.0)
                    return
                except (OSError, http.client.HTTPException):
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise ProcessStartError(
                    f"proxy not ready after {self.ready_timeout}s "
                    f"(listen port open: {listening})\nargv: {self.argv}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _close_clients(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit (raises subprocess.TimeoutExpired)."""
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        _unregister(self.proc)
        return rc

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait for exit; return the exit code.

        If it is still running after ``timeout`` it is SIGKILLed and
        ``TimeoutError`` is raised (graceful shutdown is part of the contract).
        """
        self._close_clients()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                _unregister(self.proc)
                raise TimeoutError(
                    f"proxy did not exit within {timeout}s of SIGTERM (killed)\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
        _unregister(self.proc)
        return self.proc.returncode

    stop = terminate


    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.is_running():
            try:
                self.terminate()
            except TimeoutError:
                pass

    # -- client side ------------------------------------------------------------

    def client(self, **kw: Any):
        """A ``redis.Redis`` connected to the proxy.

        Defaults: ``socket_timeout=10``, NO retries (so every command is sent
        exactly once -- counts stay exact); any keyword overrides, e.g.
        ``retry=redis.retry.Retry(...)``.  Closed on terminate/kill.
        """
        import redis

        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry": _no_retry(),
        }
        params.update(kw)
        c = redis.Redis(**params)
        self._clients.append(c)
        return c

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """``GET <admin>/<path>`` -> (status, body text); any status is returned."""
        conn = http.client.HTTPConnection(self.host, self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def healthz(self, timeout: float = 5.0) -> tuple[int, str]:
        return self.http_get("/healthz", timeout=timeout)

    def metrics_text(self, timeout: float = 5.0) -> str:
        status, body = self.http_get("/metrics", timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET /metrics -> {status}: {body[:500]}")
        return body

    def metrics(self) -> list[MetricSample]:
        """Scrape ``/metrics`` and return :func:`parse_metrics` samples."""
        return parse_metrics(self.metrics_text())

    def metric_sum(
        self, name: str, /, by: Sequence[str] = ("command",), **label_filters: str
    ) -> dict[Any, float]:
        """Scrape once and :func:`metric_sum` over the result."""
        return metric_sum(self.metrics(), name, by=by, **label_filters)


def in_threads(worker: Any, n: int, timeout: float = 120.0) -> list[BaseException]:
    """Run ``worker(i)`` for i in range(n), each in a thread of its own, all at once; return what
    they raised (an assert in a thread is otherwise only printed)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            worker(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def short_lived_gets(proxy: Any, clients: int, each: int, key: str = "k", value: bytes = b"v") -> None:
    """``clients`` threads at once, each ``each`` times: a new redis-py client connects to ``proxy``,
    GETs ``key`` (asserted to be ``value``) and closes: a web app that connects per request."""
    import redis

    def worker(_i: int) -> None:
        for _ in range(each):
            c = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=10)
            assert c.get(key) == value
            c.close()

    errors = in_threads(worker, clients)
    assert not errors, errors[:3]


# --------------------------------------------------------------------------
# INFO commandstats
# --------------------------------------------------------------------------


def parse_commandstats(info: str | Mapping[str, Any]) -> dict[str, int]:
    """``INFO commandstats`` (raw text or redis-py's parsed dict) ->
    ``{command: calls + rejected_calls}``.

    Names are lower-case as Redis prints them, subcommands as ``client|setname``.
    """
    out: dict[str, int] = {}
    if isinstance(info, (str, bytes)):
        text = info.decode() if isinstance(info, bytes) else info
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("cmdstat_"):
                continue
            # the (pre-7) "host:" pseudo command contains ':' itself
            name, _, fields = line[len("cmdstat_"):].rpartition(":")
            vals = dict(f.split("=", 1) for f in fields.split(",") if "=" in f)
            out[name] = int(vals.get("calls", 0)) + int(vals.get("rejected_calls", 0))
        return out
    for key, vals in info.items():
        if not key.startswith("cmdstat_") or not isinstance(vals, Mapping):
            continue
        out[key[len("cmdstat_"):]] = int(vals.get("calls", 0)) + int(vals.get("rejected_calls", 0))
    return out


def commandstats(client: Any) -> dict[str, int]:
    """Read ``INFO commandstats`` through ``client`` (a redis-py client
    connected DIRECTLY to the server) -> ``{command: calls + rejected_calls}``.

    Note that this very INFO call is counted by the server (it shows up in the
    *next* read); see :func:`commandstats_delta`.
    """
    return parse_commandstats(client.info("commandstats"))


def commandstats_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Commands executed between two :func:`commandstats` reads.

    ``after - before`` per command, minus the one ``info`` call made by the
    ``before`` read itself (it is counted by the server and therefore shows up
    in ``after``).  Entries that end up 0 are dropped.

    Make both reads through the same, already-connected observer client so
    its connection handshake (``HELLO``, ``AUTH``...) happened before
    ``before``; a new connection in between adds its handshake commands.
    Redis 7.0 does not list unknown commands / unknown subcommands (e.g.
    redis-py 8's ``CLIENT SETINFO`` and ``CLIENT MAINT_NOTIFICATIONS``) in
    commandstats at all -- only in ``INFO errorstats``.
    """
    out: dict[str, int] = {}
    for name in set(before) | set(after):
        d = after.get(name, 0) - before.get(name, 0)
        if name == "info":
            d -= 1
        if d:
            out[name] = d
    return out


def server_known_commands(client: Any) -> frozenset[str]:
    """The commands ``client``'s server knows, by commandstats name (``get``, ``client|setname``).

    ``client`` is a redis-py client connected DIRECTLY to the server, or a
    :class:`RespSocket`.  Uses ``COMMAND LIST``, which lists subcommands as
    ``container|sub`` (Redis 7.0: 366 names; containers are listed too).

    The call is itself counted by the server (as ``command|list``): make it
    before a :func:`commandstats` baseline or after the final read, not in
    between.
    """
    if isinstance(client, RespSocket):
        names = client.call("COMMAND", "LIST")
        if isinstance(names, RespError):
            raise RuntimeError(f"COMMAND LIST failed: {names}")
    else:
        names = client.command_list()
    out = frozenset((n.decode() if isinstance(n, bytes) else str(n)).lower() for n in names)
    if "get" not in out or not any("|" in n for n in out):
        raise RuntimeError(f"COMMAND LIST gave no commands/subcommands: {sorted(out)[:20]}")
    return out


def assert_counts_match(
    proxy_counts: Mapping[str, float],
    server_delta: Mapping[str, int],
    server_known: Iterable[str],
) -> dict[str, int]:
    """Assert the proxy's billable count by command equals the server's commandstats delta.

    ``proxy_counts`` is ``respmeter_upstream_commands_total`` by command,
    ``server_delta`` a :func:`commandstats_delta`, ``server_known``
    :func:`server_known_commands` of that server.

    Every name the server knows is compared exactly (a missing entry is 0).
    Only the names the server does NOT know are left out: the proxy's
    ``unknown`` label and commands the proxy's table names but the server
    rejects as unknown (Redis 7.0 and redis-py 5+'s ``CLIENT SETINFO``, counted
    by the proxy as ``client|setinfo``); a server never lists those in
    commandstats, which is asserted too, as is that each left-out name is
    ``unknown`` or in the proxy's command table.

    Returns the left-out part of ``proxy_counts`` (``{name: count}``) for
    further checks.  The failure message is a name-by-name diff.
    """
    from proxy.commands import UNKNOWN, all_commands

    known = frozenset(server_known)
    proxy = {k: int(v) for k, v in proxy_counts.items() if v}
    server = {k: int(v) for k, v in server_delta.items() if v}
    names = set(proxy) | set(server)
    excluded = {k for k in names if k not in known}
    table = all_commands()
    problems = []
    for k in sorted(names - excluded):
        if proxy.get(k, 0) != server.get(k, 0):
            problems.append(f"  {k}: proxy={proxy.get(k, 0)} server={server.get(k, 0)}")
    for k in sorted(excluded):
        if k in server:
            problems.append(f"  {k}: the server counted {server[k]} but does not list it in COMMAND LIST")
        elif k != UNKNOWN and k not in table:
            problems.append(f"  {k}: proxy={proxy.get(k, 0)}, a name neither the server nor the "
                            f"proxy's command table knows")
    if UNKNOWN in known:
        problems.append(f"  the server knows a command named {UNKNOWN!r}")
    left_out = {k: proxy[k] for k in sorted(excluded) if k in proxy}
    assert not problems, (
        "proxy respmeter_upstream_commands_total != server INFO commandstats:\n"
        + "\n".join(problems)
        + f"\n(left out, unknown to the server: {left_out})"
    )
    return left_out


# --------------------------------------------------------------------------
# raw RESP sockets (for tests where redis-py hides protocol details)
# --------------------------------------------------------------------------


class RespError(str):
    """An error reply (``-ERR ...`` / ``!``) as returned by :class:`RespSocket.read`."""


class RespPush(list):
    """A RESP3 push frame (``>``) as returned by :class:`RespSocket.read`."""


def encode_resp(*args: bytes | str | int) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class LoopbackServer:
    """A stand-in server on a free loopback port: each connection is handed to :meth:`talk` in a
    thread of its own (with its number, from 1). Subclasses say what it answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn, len(self.conns)), daemon=True).start()

    def _talk(self, conn: socket.socket, n: int) -> None:
        try:
            self.talk(conn, n)
        except OSError:
            pass

    def talk(self, conn: socket.socket, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class RespSocket:
    """A blocking loopback socket speaking raw RESP2/RESP3, with a full reply parser.

    ``read()`` returns bytes / int / None / list / :class:`RespError` / :class:`RespPush`
    (maps as dicts, sets as lists, doubles as float, booleans as bool).
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, *args: bytes | str | int) -> None:
        self.send(encode_resp(*args))

    def call(self, *args: bytes | str | int) -> Any:
        self.command(*args)
        return self.read()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            self._fill()

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[: n + 2]
        return data

    def read(self) -> Any:
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest
        if t == b"-":
            return RespError(rest.decode(errors="replace"))
        if t == b":":
            return int(rest)
        if t in (b"$", b"=", b"!"):
            n = int(rest)
            if n < 0:
                return None
            data = self._exact(n)
            return RespError(data.decode(errors="replace")) if t == b"!" else data
        if t in (b"*", b">", b"~"):
            n = int(rest)
            if n < 0:
                return None
            items = [self.read() for _ in range(n)]
            return RespPush(items) if t == b">" else items
        if t == b"%":
            n = int(rest)
            return {self._hashable(self.read()): self.read() for _ in range(n)}
        if t == b"|":  # attribute: skip it, return the value it annotates
            n = int(rest)
            for _ in range(2 * n):
                self.read()
            return self.read()
        if t == b"_":
            return None
        if t == b"#":
            return rest == b"t"
        if t == b",":
            return float(rest)
        if t == b"(":
            return int(rest)
        raise AssertionError(f"unexpected RESP line {line!r}")

    @staticmethod
    def _hashable(x: Any) -> Any:
        return tuple(x) if isinstance(x, list) else x

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Read (and discard) until EOF/reset; True if the peer closed within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = self.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    return True
                if not chunk:
                    return True
                self.buf += chunk
            return False
        finally:
            self.sock.settimeout(10.0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RespSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# a real Celery worker (for end-to-end tests through the proxy)
# --------------------------------------------------------------------------

CELERY_APP = '''
import json
import os

from celery import Celery

url = os.environ["RESPMETER_TEST_URL"]
app = Celery("rmapp", broker=url, backend=url)
app.conf.broker_transport_options = json.loads(os.environ.get("RESPMETER_TEST_TRANSPORT_OPTIONS") or "{}")


@app.task
def add(x, y):
    return {"sum": x + y, "pid": os.getpid()}
'''


class CeleryWorker:
    """``celery -A rmapp worker --pool solo -c 1`` as a real child process.

    ``url`` is the broker AND result backend URL (normally the proxy's).
    ``transport_options`` become ``broker_transport_options`` (JSON-able dict);
    ``worker_args`` are appended to the worker command line (e.g.
    ``["--without-heartbeat"]``); ``stop()`` waits ``stop_timeout`` seconds
    for a warm shutdown before SIGKILL.  The app module (task ``rmapp.add``) is
    written to ``<workdir>/app``; the worker's output goes to
    ``<workdir>/worker.log``.  Registered for the session-end kill.
    """

    def __init__(
        self,
        url: str,
        workdir: str | os.PathLike[str],
        *,
        transport_options: Mapping[str, Any] | None = None,
        worker_args: Sequence[str] = (),
        loglevel: str = "info",
        stop_timeout: float = 15.0,
    ) -> None:
        self.url = url
        self.stop_timeout = stop_timeout
        self.workdir = Path(workdir)
        self.appdir = self.workdir / "app"
        self.log_path = self.workdir / "worker.log"
        self.transport_options = dict(transport_options or {})
        self.worker_args = [str(a) for a in worker_args]
        self.loglevel = loglevel
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> "CeleryWorker":
        import json

        self.appdir.mkdir(parents=True, exist_ok=True)
        (self.appdir / "rmapp.py").write_text(CELERY_APP)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.appdir) + os.pathsep + env.get("PYTHONPATH", "")
        env["RESPMETER_TEST_URL"] = self.url
        env["RESPMETER_TEST_TRANSPORT_OPTIONS"] = json.dumps(self.transport_options)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _deathsig_prefix()
                + [sys.executable, "-m", "celery", "-A", "rmapp", "worker", "--pool", "solo", "-c", "1",
                   "--loglevel", self.loglevel, *self.worker_args],
                cwd=self.appdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        _register(self.proc)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the worker logs ``ready.`` (raises ProcessStartError with its log otherwise)."""
        deadline = time.monotonic() + timeout
        while "ready." not in self.log_text():
            if not self.is_running() or time.monotonic() > deadline:
                raise ProcessStartError(f"celery worker not ready\n--- {self.log_path} ---\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """utime + stime of the worker process so far (from /proc/<pid>/stat)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        # fields[0] is field 3 (state): utime and stime are fields 14 and 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout`` (default ``stop_timeout``) seconds."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _unregister(self.proc)
        return self.proc.returncode

    def __enter__(self) -> "CeleryWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def celery_call(url: str, task: str = "rmapp.add", args: Sequence[Any] = (2, 40), timeout: float = 15.0) -> Any:
    """Submit ``task`` by name through ``url`` (broker and result backend) and wait for its result."""
    from celery import Celery

    app = Celery("rmproducer", broker=url, backend=url)
    try:
        return app.send_task(task, args=list(args)).get(timeout=timeout)
    finally:
        app.close()
