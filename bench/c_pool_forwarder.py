"""A zero-work pooled forwarder whose protocols are C types: the ceiling of the pool's design with
no interpreter work per request.

``bench/pool_forwarder.py`` is the pool's design in Python (one shared upstream connection, writes
batched per loop turn, replies cut at frame boundaries and routed back in order) with no counting
or policy. This is the same design with its two protocols written in C (``c_pool_forwarder.c``),
on the same uvloop loop and transports: what it costs is the event loop and the system calls.
``proxy_bench.py --with-forwarder`` runs it beside the pool, so the share of the pool's time that a
C core for its plain path could win back can be read from one run. A benchmark tool only: it
assumes what ``redis-benchmark`` sends.

It is compiled on first use with the C compiler Python was built with, into a cache directory
(``--build-only`` just builds it; exit status 3 when it cannot be built).

    python bench/c_pool_forwarder.py LISTEN_PORT UPSTREAM_PORT   (loopback only)
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forwarder import nodelay, serve  # noqa: E402

SOURCE = Path(__file__).with_suffix(".c")


def build() -> ModuleType:
    """The extension, compiled if its source changed since the last build (RuntimeError if it cannot be)."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path(tempfile.gettempdir())) / "respmeter-bench"
    cache.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = cache / f"c_pool_forwarder-{tag}{suffix}"
    if not target.exists():
        cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
        include = sysconfig.get_paths()["include"]
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        argv = [*cc, "-O2", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-o", str(tmp)]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot run the C compiler ({shlex.join(argv)}): {exc}") from None
        if out.returncode != 0:
            raise RuntimeError(f"the C pooled forwarder does not build:\n{out.stderr[-2000:]}")
        tmp.replace(target)
    spec = importlib.util.spec_from_file_location("c_pool_forwarder", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_with(c: ModuleType):  # noqa: ANN201
    class Shared(c.Shared):  # type: ignore[name-defined,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nodelay(transport)
            super().connection_made(transport)

    class Client(c.Client):  # type: ignore[name-defined,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nodelay(transport)
            super().connection_made(transport)

    async def main(listen: int, upstream: int) -> None:
        loop = asyncio.get_running_loop()
        _, shared = await loop.create_connection(Shared, "127.0.0.1", upstream)
        c.set_shared(shared)
        await loop.create_server(Client, "127.0.0.1", listen)
        await asyncio.Event().wait()

    return main


if __name__ == "__main__":
    try:
        module = build()
    except RuntimeError as exc:
        print(f"c_pool_forwarder: {exc}", file=sys.stderr)
        sys.exit(3)
    if sys.argv[1:] == ["--build-only"]:
        sys.exit(0)
    serve(main_with(module))
