"""Addresses, upstream URLs and secrets masking."""

from __future__ import annotations

import dataclasses
import ipaddress
from urllib.parse import unquote, urlsplit


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which and why (never a secret)."""


@dataclasses.dataclass(frozen=True)
class Listen:
    """Where a listener accepts clients: TCP ``host:port`` or a unix socket ``path``."""

    name: str | None
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        where = self.path if self.path else f"{_bracket(self.host or '')}:{self.port}"
        return f"{self.name}={where}" if self.name else where

    @property
    def is_loopback(self) -> bool:
        if self.path:
            return True
        host = self.host or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{what}: expected [IPv6]:PORT, got {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    if not host:
        raise ConfigError(f"{what}: missing host in {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number, got {port!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{what}: port out of range: {p}")
    return host, p


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[::1]:PORT``, a unix socket path (``/run/x.sock`` or ``unix:/path``), each
    optionally prefixed by a listener name ``name=``."""
    text = text.strip()
    name = None
    head, eq, rest = text.partition("=")
    if eq and "/" not in head and ":" not in head:
        name, text = head.strip(), rest.strip()
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--listen: bad listener name {name!r}")
    if text.startswith("unix:"):
        return Listen(name, path=text[5:])
    if text.startswith("/") or text.startswith("./"):
        return Listen(name, path=text)
    host, port = parse_hostport(text, "--listen")
    return Listen(name, host=host, port=port)


@dataclasses.dataclass(frozen=True)
class Upstream:
    scheme: str  # redis, rediss, unix
    host: str | None
    port: int | None
    path: str | None
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    db: int

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def masked(self) -> str:
        return mask_url(self)

    def __str__(self) -> str:
        return self.masked()

    def address(self) -> str:
        if self.path:
            return self.path
        return f"{_bracket(self.host or '')}:{self.port}"


def parse_upstream(url: str, flag: str = "--upstream") -> Upstream:
    """A redis://, rediss:// or unix:// URL; errors name ``flag`` (--upstream, --state-url)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise ConfigError(f"{flag}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        also = " (or the word upstream)" if flag == "--state-url" else ""
        raise ConfigError(
            f"{flag}: scheme must be redis://, rediss:// or unix://{also}, got {scheme or 'none'!r}"
        )
    try:
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        port = parts.port
    except ValueError:
        raise ConfigError(f"{flag}: bad port") from None
    db = 0
    if scheme == "unix":
        path = parts.path
        if not path:
            raise ConfigError(f"{flag}: unix:// needs a socket path")
        query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
        if "db" in query:
            db = _parse_db(query["db"], flag)
        return Upstream("unix", None, None, path, username, password, db)
    host = parts.hostname
    if not host:
        raise ConfigError(f"{flag}: missing host")
    if parts.path and parts.path != "/":
        db = _parse_db(parts.path.lstrip("/"), flag)
    return Upstream(scheme, host, port or 6379, None, username, password, db)


def check_state_url(text: str) -> None:
    """--state-url: "upstream", or a URL as for --upstream (raises ConfigError naming --state-url)."""
    if text and text.strip().lower() != "upstream":
        parse_upstream(text, "--state-url")


def _parse_db(text: str, flag: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ConfigError(f"{flag}: database must be a number, got {text!r}") from None
    if db < 0:
        raise ConfigError(f"{flag}: database must not be negative")
    return db


def mask_url(u: Upstream) -> str:
    """The URL with any password replaced by ``****``."""
    auth = ""
    if u.username or u.password is not None:
        auth = (u.username or "")
        if u.password is not None:
            auth += ":****"
        auth += "@"
    if u.scheme == "unix":
        return f"unix://{auth}{u.path}" + (f"?db={u.db}" if u.db else "")
    return f"{u.scheme}://{auth}{_bracket(u.host or '')}:{u.port}" + (f"/{u.db}" if u.db else "")


def mask_secrets(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "****")
    return text
