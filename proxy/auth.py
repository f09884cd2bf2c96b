"""Client authentication (proxy users) and upstream credential injection. Plain objects, no I/O.

* Proxy users come from a TOML file: ``[users.NAME]`` with ``password_hash`` (from
  ``respmeter hash-password``) and an optional ``label`` (the ``client`` label of their commands).
* Upstream credentials come from the upstream URL, ``RESPMETER_UPSTREAM_PASSWORD`` or a password file.
  They authenticate every upstream connection lazily, just before its first forwarded command, so a
  client that never authenticates (or never sends anything) costs no billable command. A client's
  ``HELLO`` carries them when it is the first command (``HELLO 3 AUTH user pass``: no extra command).
* A client's own ``AUTH`` / ``HELLO … AUTH`` is answered by the proxy, never forwarded with the
  client's credentials, when the proxy has users or upstream credentials. With neither, the proxy is
  transparent and forwards it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .resp import encode_command, encode_error

NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
HELLO_NOAUTH = encode_error(
    "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO "
    "<proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP "
    "protocol version at the same time"
)
# Commands an unauthenticated client may send (everything else gets NOAUTH)
PRE_AUTH = frozenset({"auth", "hello", "quit", "reset"})

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AuthConfigError(ValueError):
    pass


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(dk).decode()}"


def verify_hash(password: bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), maxmem=256 << 20, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def check_hash_format(stored: str) -> str | None:
    """None when ``stored`` looks like a hash from hash_password, else what is wrong."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return "password_hash must come from `respmeter hash-password` (scrypt$N$r$p$salt$hash)"
    try:
        int(parts[1]), int(parts[2]), int(parts[3])
        base64.b64decode(parts[4], validate=True)
        base64.b64decode(parts[5], validate=True)
    except ValueError:
        return "password_hash is malformed"
    return None


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    label: str


def users_problems(data: dict) -> tuple[dict[str, User], list[tuple[list[str], str]]]:
    """Users from a parsed TOML table ``{"users": {NAME: {password_hash, label}}}``, and every problem
    found, as (key path under ``users``, message); a user with a problem is left out. Messages never
    include a hash."""
    users: dict[str, User] = {}
    problems: list[tuple[list[str], str]] = []
    table = data.get("users", {})
    if not isinstance(table, dict):
        return users, [([], "[users] must be a table")]
    for name, spec in table.items():
        if not isinstance(spec, dict):
            problems.append(([name], "must be a table"))
            continue
        mine: list[tuple[list[str], str]] = []
        for key in sorted(set(spec) - {"password_hash", "label"}):
            mine.append(([name, key], "unknown key (expected password_hash or label)"))
        ph = spec.get("password_hash")
        if not isinstance(ph, str):
            mine.append(([name, "password_hash"], "password_hash is required"))
        else:
            problem = check_hash_format(ph)
            if problem:
                mine.append(([name, "password_hash"], problem))
        label = spec.get("label", name)
        if not isinstance(label, str) or not label:
            mine.append(([name, "label"], "label must be a non-empty string"))
        if mine:
            problems.extend(mine)
        else:
            users[name] = User(name, ph, label)  # type: ignore[arg-type]
    return users, problems


def parse_users(data: dict, where: str) -> dict[str, User]:
    """Users from a parsed TOML table; AuthConfigError names the first problem."""
    users, problems = users_problems(data)
    if problems:
        keys, msg = problems[0]
        if not keys:
            raise AuthConfigError(f"{where}: {msg}")
        if msg == "must be a table":
            raise AuthConfigError(f"{where}: users.{keys[0]} must be a table")
        if len(keys) == 2 and msg.startswith("unknown key"):
            raise AuthConfigError(f"{where}: users.{keys[0]}: {keys[1]}: {msg}")
        raise AuthConfigError(f"{where}: users.{keys[0]}: {msg}")
    return users


def load_users_file(path: str) -> dict[str, User]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise AuthConfigError(f"--users {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"--users {path}: {exc}") from None
    unknown = set(data) - {"users"}
    if unknown:
        raise AuthConfigError(f"--users {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return parse_users(data, f"--users {path}")


class Verifier:
    """Checks user/password pairs. The slow hash runs off the event loop (``offload``); outcomes are
    remembered under a keyed digest so each pair is hashed once per process, and the plain password
    is never kept."""

    def __init__(self, users: dict[str, User], offload: Callable[[Callable[[], bool], Callable[[bool], None]], None] | None = None) -> None:
        self.users = users
        self.offload = offload
        self._key = secrets.token_bytes(32)
        self._known: OrderedDict[bytes, bool] = OrderedDict()
        self._running: dict[bytes, list[Callable[[], None]]] = {}

    def _digest(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, user + b"\0" + password, hashlib.sha256).digest()

    def check(self, user: bytes, password: bytes, wake: Callable[[], None]) -> bool | None:
        """True/False when known; None while the check runs (``wake`` is called when done)."""
        d = self._digest(user, password)
        known = self._known.get(d)
        if known is not None:
            return known
        u = self.users.get(user.decode("utf-8", "replace"))
        if u is None:
            return False
        if self.offload is None:
            self._remember(d, verify_hash(password, u.password_hash))
            return self._known[d]
        waiters = self._running.get(d)
        if waiters is not None:
            waiters.append(wake)
            return None
        self._running[d] = [wake]

        def done(ok: bool) -> None:
            self._remember(d, ok)
            for w in self._running.pop(d, []):
                w()

        self.offload(lambda: verify_hash(password, u.password_hash), done)
        return None

    def _remember(self, d: bytes, ok: bool) -> None:
        self._known[d] = ok
        self._known.move_to_end(d)
        while len(self._known) > 10_000:
            self._known.popitem(last=False)


class FailureThrottle:
    """Slows down repeated authentication failures from one address: after ``free`` failures each
    WRONGPASS is delayed, doubling up to ``max_delay``. Bounded memory (least recent addresses go)."""

    def __init__(self, free: int = 3, base: float = 0.1, max_delay: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.free = free
        self.base = base
        self.max_delay = max_delay
        self.clock = clock
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def delay(self, addr: str) -> float:
        n, last = self._fails.get(addr, (0, 0.0))
        if n and self.clock() - last > 600:  # forgiven after 10 quiet minutes
            self._fails.pop(addr, None)
            return 0.0
        if n < self.free:
            return 0.0
        return min(self.max_delay, self.base * 2 ** (n - self.free))

    def failed(self, addr: str) -> None:
        n, _ = self._fails.get(addr, (0, 0.0))
        self._fails[addr] = (n + 1, self.clock())
        self._fails.move_to_end(addr)
        while len(self._fails) > 10_000:
            self._fails.popitem(last=False)

    def succeeded(self, addr: str) -> None:
        self._fails.pop(addr, None)


@dataclass(frozen=True)
class UpstreamAuth:
    """What authenticates an upstream connection."""

    username: str | None
    password: str | None
    db: int = 0

    def commands(self) -> list[list[bytes]]:
        out = []
        if self.password is not None:
            if self.username:
                out.append([b"AUTH", self.username.encode(), self.password.encode()])
            else:
                out.append([b"AUTH", self.password.encode()])
        if self.db:
            out.append([b"SELECT", str(self.db).encode()])
        return out

    def hello_auth(self) -> list[bytes]:
        if self.password is None:
            return []
        return [b"AUTH", (self.username or "default").encode(), self.password.encode()]

    @property
    def active(self) -> bool:
        return self.password is not None or bool(self.db)

    @property
    def secrets(self) -> list[str]:
        return [self.password] if self.password else []


def split_hello(args: list[bytes]) -> tuple[list[bytes], tuple[bytes, bytes] | None]:
    """HELLO's arguments without its AUTH option, and the (user, password) it carried."""
    out = args[:2]
    creds = None
    i = 2
    while i < len(args):
        opt = args[i].lower()
        if opt == b"auth" and i + 2 < len(args):
            creds = (args[i + 1], args[i + 2])
            i += 3
        elif opt == b"setname" and i + 1 < len(args):
            out += args[i : i + 2]
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out, creds


def encode_handshake(cmds: list[list[bytes]]) -> bytes:
    return b"".join(encode_command(c) for c in cmds)
