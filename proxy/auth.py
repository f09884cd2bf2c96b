"""Client authentication (proxy users) and upstream credential injection. Plain objects, no I/O.

* Proxy users come from a TOML file: ``[users.NAME]`` with ``password_hash`` (from
  ``respmeter hash-password``) and an optional ``label`` (the ``client`` label of their commands).
* Upstream credentials come from the upstream URL, ``RESPMETER_UPSTREAM_PASSWORD`` or a password file.
  They authenticate every upstream connection lazily, just before its first forwarded command, so a
  client that never authenticates (or never sends anything) costs no billable command; that command
  waits for the answer, and nothing is forwarded if they are refused (proxy.gate). A client's
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
# The failed-login budget of one source address (FailureThrottle): this many at once, then one more
# every LOGIN_FAILURE_EVERY seconds (12 a minute)
LOGIN_FAILURE_BURST = 10
LOGIN_FAILURE_EVERY = 5.0


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


def decoy_hash(like: str | None = None) -> str:
    """A hash no password matches, that costs what checking ``like`` (or a new hash) costs: what an
    unknown user's password is checked against, so that an unknown user is not told apart from a
    wrong password by the time the answer takes."""
    n, r, p, dklen = SCRYPT_N, SCRYPT_R, SCRYPT_P, 32
    if like is not None and check_hash_format(like) is None:
        _, n_, r_, p_, _, dk = like.split("$")
        n, r, p, dklen = int(n_), int(r_), int(p_), len(base64.b64decode(dk)) or 32
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(os.urandom(16)).decode()}${b64(os.urandom(dklen)).decode()}"


class Verifier:
    """Checks user/password pairs. The slow hash runs off the event loop (``offload``); outcomes are
    remembered under a keyed digest so each pair is hashed once per process, and the plain password
    is never kept. A user that does not exist costs the same hash work as a wrong password (against
    :func:`decoy_hash`), so the time an answer takes does not tell which users exist."""

    def __init__(self, users: dict[str, User], offload: Callable[[Callable[[], bool], Callable[[bool], None]], None] | None = None) -> None:
        self.users = users
        self.offload = offload
        self._key = secrets.token_bytes(32)
        self._known: OrderedDict[bytes, bool] = OrderedDict()
        self._running: dict[bytes, list[Callable[[], None]]] = {}
        self._decoy = decoy_hash(next(iter(users.values())).password_hash if users else None)

    def _digest(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, user + b"\0" + password, hashlib.sha256).digest()

    def outcome(self, user: bytes, password: bytes) -> bool | None:
        """The remembered outcome of this pair, or None if it was never (or not yet) checked."""
        return self._known.get(self._digest(user, password))

    def check(self, user: bytes, password: bytes, wake: Callable[[], None]) -> bool | None:
        """True/False when known; None while the check runs (``wake`` is called when done)."""
        d = self._digest(user, password)
        known = self._known.get(d)
        if known is not None:
            return known
        u = self.users.get(user.decode("utf-8", "replace"))
        stored = u.password_hash if u is not None else self._decoy
        if self.offload is None:
            self._remember(d, verify_hash(password, stored) and u is not None)
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

        self.offload(lambda: verify_hash(password, stored) and u is not None, done)
        return None

    def _remember(self, d: bytes, ok: bool) -> None:
        self._known[d] = ok
        self._known.move_to_end(d)
        while len(self._known) > 10_000:
            self._known.popitem(last=False)


class FailureThrottle:
    """The failed-login budget of each source address: ``burst`` failures at once, then one more
    every ``per`` seconds (a token bucket, refilled continuously).

    A check whose outcome is not known yet holds one unit of its address's budget while it runs
    (:meth:`begin` ... :meth:`end`), so an address can never have more checks running than it has
    failures left, however many connections it opens. A failure spends its unit; a success gives its
    own unit back and nothing more: another account's success does not restore the budget. Memory
    is bounded: an address whose budget is full and idle is forgotten, and beyond ``max_addresses``
    the least recently seen go.
    """

    __slots__ = ("burst", "per", "clock", "max_addresses", "_state")

    def __init__(
        self,
        burst: int = LOGIN_FAILURE_BURST,
        per: float = LOGIN_FAILURE_EVERY,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10_000,
    ) -> None:
        self.burst = burst
        self.per = per
        self.clock = clock
        self.max_addresses = max_addresses
        # addr -> [failures left (float, refilled with time), when that was computed, checks running]
        self._state: OrderedDict[str, list] = OrderedDict()

    def _get(self, addr: str) -> list:
        now = self.clock()
        st = self._state.get(addr)
        if st is None:
            st = self._state[addr] = [float(self.burst), now, 0]
            while len(self._state) > self.max_addresses:
                self._state.popitem(last=False)
        else:
            st[0] = min(float(self.burst), st[0] + max(0.0, now - st[1]) / self.per)
            st[1] = now
            self._state.move_to_end(addr)
        return st

    def begin(self, addr: str) -> float:
        """0.0: a check may start now, and holds one unit until :meth:`end`. Otherwise the seconds
        until the budget can allow one (ask again then, or sooner if a check of this address ends
        well)."""
        st = self._get(addr)
        if st[0] - st[2] >= 1.0:
            st[2] += 1
            return 0.0
        return max(0.001, (st[2] + 1.0 - st[0]) * self.per)

    def end(self, addr: str, failed: bool) -> None:
        """The check begun for ``addr`` is over: a failure spends its unit, a success returns it."""
        st = self._get(addr)
        st[2] = max(0, st[2] - 1)
        if failed:
            st[0] = max(0.0, st[0] - 1.0)
        if st[2] == 0 and st[0] >= self.burst:
            del self._state[addr]

    def left(self, addr: str) -> float:
        """Failures ``addr`` may still have now (checks running count as failures)."""
        st = self._state.get(addr)
        if st is None:
            return float(self.burst)
        return min(float(self.burst), st[0] + max(0.0, self.clock() - st[1]) / self.per) - st[2]


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
