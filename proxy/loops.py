"""Event loop selection: uvloop when it is importable, the stdlib loop otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(kind: str = "auto") -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """(factory, name) for ``kind`` in auto, uvloop, asyncio."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
