"""Windowed counts of the commands savers answered (``Stats.saved``), for ``respmeter report``.

``Stats.saved`` holds totals since the proxy started, per (client, command, saver). The report wants
them over a window, as it has the upstream traffic, and the state directory keeps them per day for
the report of a stopped proxy. :class:`SavedWindow` takes what ``Stats.saved`` grew by since it last
looked (every second when the usage state is flushed, and whenever a window is asked for) and keeps
it in the buckets of a :class:`~proxy.patterns.PatternTracker` keyed by (client, command, saver):
the same windowing arithmetic, and the same start, as the key patterns of the upstream traffic. The
hot path does nothing more than ``Stats.count_saved``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .patterns import PatternTracker


class SavedWindow:
    """Per-tick buckets of ``stats.saved``'s growth; :meth:`window` and :meth:`take_deltas` as in
    :class:`~proxy.patterns.PatternTracker`, with keys (client, command, saver)."""

    __slots__ = ("stats", "tracker", "_seen")

    def __init__(self, stats: Any, clock: Callable[[], float] = time.time, started: float | None = None) -> None:
        self.stats = stats
        self.tracker = PatternTracker(clock=clock, started=started)
        self._seen: dict[tuple[str, str, str], int] = {}

    def pull(self) -> None:
        """Add what was saved since the last call to the current bucket."""
        seen = self._seen
        cur = self.tracker.cur
        for key, n in list(self.stats.saved.items()):
            d = n - seen.get(key, 0)
            if d > 0:
                seen[key] = n
                cur[key] = cur.get(key, 0) + d

    def window(self, seconds: float) -> tuple[dict[tuple[str, str, str], int], float]:
        self.pull()
        return self.tracker.window(seconds)

    def take_deltas(self) -> dict[tuple[str, str, str], tuple[int, float, float]]:
        self.pull()
        return self.tracker.take_deltas()


def saved_window(stats: Any) -> SavedWindow | None:
    """The :class:`SavedWindow` of ``stats`` (kept as ``stats.saved_window``, made on first use and
    started with the key patterns' tracker when there is one); None without ``stats.saved``."""
    if stats is None or getattr(stats, "saved", None) is None:
        return None
    sw = getattr(stats, "saved_window", None)
    if sw is None:
        patterns = getattr(stats, "patterns", None)
        if patterns is not None:
            sw = SavedWindow(stats, clock=patterns.clock, started=patterns.started())
        else:
            sw = SavedWindow(stats)
        stats.saved_window = sw
    return sw
