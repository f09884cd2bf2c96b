"""The admin HTTP endpoint: ``GET /metrics``, ``GET /healthz`` and JSON APIs.

A deliberately small HTTP/1.1 server on asyncio streams: one request per connection, bounded request
size and time, GET and HEAD only. Extra routes are registered by other modules (``add_route``).

With a token (``--admin-token``), every path but ``/healthz`` needs ``Authorization: Bearer TOKEN``
(compared in constant time) and answers 401 without it. ``/healthz`` stays open because container
probes (Kubernetes, Docker's HEALTHCHECK) cannot send a token; without the token it gives only its
status and ``ok`` / ``unavailable``, never the reason (which names the upstream).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .health import Health

log = logging.getLogger("respmeter.admin")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[dict[str, list[str]]], Awaitable[Response]]

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}
# what a probe may read without the token
OPEN_PATHS = frozenset({"/healthz"})
UNAUTHORIZED = b"unauthorized: send the admin token as 'Authorization: Bearer TOKEN'\n"
CHALLENGE = [("WWW-Authenticate", 'Bearer realm="respmeter"')]


def json_response(obj: object, status: int = 200) -> Response:
    return status, "application/json", (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def bearer_token(head: bytes) -> bytes | None:
    """The credentials of the first ``Authorization: Bearer ...`` header of a request head."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            scheme, _, cred = value.strip().partition(b" ")
            return cred.strip() if scheme.lower() == b"bearer" else None
    return None


def client_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for a client of the admin API (``respmeter usage``, ``report``, ``top``): the token
    from RESPMETER_ADMIN_TOKEN or the file RESPMETER_ADMIN_TOKEN_FILE names, if any."""
    env = os.environ if env is None else env
    token = env.get("RESPMETER_ADMIN_TOKEN") or ""
    if not token and env.get("RESPMETER_ADMIN_TOKEN_FILE"):
        try:
            with open(env["RESPMETER_ADMIN_TOKEN_FILE"], encoding="utf-8") as f:
                token = f.read().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def unreachable(admin: str, exc: Exception, env: dict[str, str] | None = None) -> str:
    """What ``respmeter usage``, ``report`` and ``top`` say when the admin endpoint did not serve
    them: a refused token is named as such, with the variables that carry it (never the token)."""
    if getattr(exc, "code", None) == 401:
        if client_headers(env):
            return (f"the admin endpoint {admin} refused the token (HTTP 401): check RESPMETER_ADMIN_TOKEN "
                    "or the file RESPMETER_ADMIN_TOKEN_FILE names")
        return (f"the admin endpoint {admin} requires a token (HTTP 401): set RESPMETER_ADMIN_TOKEN, or "
                "RESPMETER_ADMIN_TOKEN_FILE to a file holding it")
    return f"cannot reach the admin endpoint {admin}: {exc}"


class AdminServer:
    def __init__(self, registry: CollectorRegistry, health: Health, token: str | None = None) -> None:
        self.registry = registry
        self.health = health
        self._token = token.encode() if token else None
        self.routes: dict[str, Handler] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
        }
        self.server: asyncio.AbstractServer | None = None

    def add_route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("admin endpoint on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)

    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _metrics(self, query: dict[str, list[str]]) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    async def _healthz(self, query: dict[str, list[str]]) -> Response:
        healthy, reason = await self.health.check()
        return (200 if healthy else 503), "text/plain; charset=utf-8", (reason + "\n").encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            if len(head) > MAX_HEAD:
                await self._send(writer, 400, "text/plain", b"request too large\n", False)
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._send(writer, 400, "text/plain", b"bad request\n", False)
                return
            method, target, _ = parts
            url = urlsplit(target)
            authorized = self._authorized(head)
            if not authorized and url.path not in OPEN_PATHS:
                await self._send(writer, 401, "text/plain", UNAUTHORIZED, method == "HEAD", CHALLENGE)
                return
            handler = self.routes.get(url.path)
            if handler is None:
                await self._send(writer, 404, "text/plain", b"not found\n", method == "HEAD")
                return
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, "text/plain", b"method not allowed\n", False)
                return
            try:
                status, ctype, body = await handler(parse_qs(url.query))
            except Exception:  # noqa: BLE001 - a broken handler must not kill the endpoint
                log.exception("admin handler %s failed", url.path)
                status, ctype, body = 500, "text/plain", b"internal error\n"
            if not authorized:  # an open path, asked without the token: the status only
                body = b"ok\n" if status == 200 else b"unavailable\n"
            await self._send(writer, status, ctype, body, method == "HEAD")
        finally:
            writer.close()

    def _authorized(self, head: bytes) -> bool:
        if self._token is None:
            return True
        given = bearer_token(head)
        return given is not None and hmac.compare_digest(given, self._token)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        ctype: str,
        body: bytes,
        head_only: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        more = "".join(f"{k}: {v}\r\n" for k, v in extra or ())
        hdr = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{more}"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(hdr if head_only else hdr + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
