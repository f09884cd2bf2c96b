"""Durable usage state in SQLite: cap reservations (leases) and per-window counts.

Cap budget is reserved in blocks that are written durably *before* any of it is spent, so a crash
(kill -9) can over-count by at most one unspent block and never lets a command through uncounted.
Each proxy process owns its lease rows; several processes sharing the state directory serialise their
reservations with ``BEGIN IMMEDIATE``, so their reservations together never pass a cap.

Usage reported for a window counts, per lease: what a live owner has spent (flushed every second), or
everything a dead owner had reserved (it may have spent all of it).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS lease (
    win TEXT NOT NULL,          -- 'day:2026-11-25' or 'month:2026-11'
    scope TEXT NOT NULL,        -- '' (all clients) or a client identity
    owner TEXT NOT NULL,        -- host:pid:start
    reserved INTEGER NOT NULL,  -- budget taken from the cap, durable before use
    spent INTEGER NOT NULL,     -- budget used, as last flushed
    beat REAL NOT NULL,         -- owner's last heartbeat (unix time)
    closed INTEGER NOT NULL DEFAULT 0,  -- owner released what it did not spend
    PRIMARY KEY (win, scope, owner)
);
CREATE TABLE IF NOT EXISTS counts (
    win TEXT NOT NULL, client TEXT NOT NULL, command TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (win, client, command)
);
CREATE TABLE IF NOT EXISTS patterns (
    win TEXT NOT NULL, client TEXT NOT NULL, command TEXT NOT NULL, pattern TEXT NOT NULL,
    n INTEGER NOT NULL, first REAL NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (win, client, command, pattern)
);
-- commands savers answered instead of the upstream (proxy.savedcounts), for reports
CREATE TABLE IF NOT EXISTS saved (
    win TEXT NOT NULL, client TEXT NOT NULL, command TEXT NOT NULL, saver TEXT NOT NULL,
    n INTEGER NOT NULL, first REAL NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (win, client, command, saver)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

class StateUnavailable(Exception):
    """The shared state store (proxy.sharedstore) cannot be reached or refused a call: callers fail
    closed, as for a SQLite error."""


DEAD_AFTER = 15.0  # seconds without a heartbeat before another host's lease counts as dead


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME")
    if base:
        return Path(base) / "respmeter"
    return Path.home() / ".local" / "state" / "respmeter"


class Store:
    def __init__(self, state_dir: str | os.PathLike, *, clock=time.time, owner: str | None = None, durable: bool = False) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "usage.sqlite3"
        self.clock = clock
        self.host = socket.gethostname()
        self.owner = owner or f"{self.host}:{os.getpid()}:{time.time_ns()}"
        self.started = clock()
        # The proxy waits for the lock on its event loop: keep that short (a reservation that cannot
        # be written fails closed, see Limits.admit).
        self.db = sqlite3.connect(self.path, timeout=2, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (the WAL is in the OS cache); FULL also survives power loss.
        self.db.execute("PRAGMA synchronous=%s" % ("FULL" if durable else "NORMAL"))
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- leases -------------------------------------------------------------------------------
    def reserve(self, wants: list[tuple[str, str, int, int]]) -> list[int]:
        """Reserve budget. ``wants`` holds (win, scope, amount, cap); returns the grant for each
        (at most what is left under the cap, never negative), durably recorded before returning."""
        now = self.clock()
        grants = []
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for win, scope, amount, cap in wants:
                (total,) = db.execute(
                    "SELECT COALESCE(SUM(reserved), 0) FROM lease WHERE win=? AND scope=?", (win, scope)
                ).fetchone()
                grant = max(0, min(amount, cap - total))
                if grant:
                    db.execute(
                        "INSERT INTO lease (win, scope, owner, reserved, spent, beat, closed) "
                        "VALUES (?, ?, ?, ?, 0, ?, 0) ON CONFLICT(win, scope, owner) DO UPDATE SET "
                        "reserved = reserved + excluded.reserved, beat = excluded.beat, closed = 0",
                        (win, scope, self.owner, grant, now),
                    )
                grants.append(grant)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return grants

    def flush(
        self,
        spent: Iterable[tuple[str, str, int]],
        counts: Iterable[tuple[str, str, str, int]] = (),
        patterns: Iterable[tuple[str, str, str, str, int, float, float]] = (),
        release: Iterable[tuple[str, str, int]] = (),
        saved: Iterable[tuple[str, str, str, str, int, float, float]] = (),
    ) -> None:
        """Record what this process spent (absolute, per lease), count deltas, pattern deltas,
        and give back unspent budget (``release``: win, scope, amount); ``saved``: deltas of the
        commands savers answered (win, client, command, saver, n, first, last)."""
        now = self.clock()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "UPDATE lease SET spent=?, beat=? WHERE win=? AND scope=? AND owner=?",
                [(n, now, win, scope, self.owner) for win, scope, n in spent],
            )
            db.execute("UPDATE lease SET beat=? WHERE owner=?", (now, self.owner))
            # when this process was alive, for reports on a stopped proxy's state
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value = substr(value, 1, instr(value, ',')) || ?",
                ("alive:" + self.owner, f"{self.started},{now}", str(now)),
            )
            db.executemany(
                "UPDATE lease SET reserved = MAX(spent, reserved - ?) WHERE win=? AND scope=? AND owner=?",
                [(n, win, scope, self.owner) for win, scope, n in release],
            )
            db.executemany(
                "INSERT INTO counts (win, client, command, n) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(win, client, command) DO UPDATE SET n = n + excluded.n",
                list(counts),
            )
            db.executemany(
                "INSERT INTO patterns (win, client, command, pattern, n, first, last) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(win, client, command, pattern) DO UPDATE SET n = n + excluded.n, "
                "first = MIN(first, excluded.first), last = MAX(last, excluded.last)",
                list(patterns),
            )
            db.executemany(
                "INSERT INTO saved (win, client, command, saver, n, first, last) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(win, client, command, saver) DO UPDATE SET n = n + excluded.n, "
                "first = MIN(first, excluded.first), last = MAX(last, excluded.last)",
                list(saved),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close_leases(self) -> None:
        """On a clean exit: what was reserved and not spent goes back."""
        self.db.execute("UPDATE lease SET reserved = spent, closed = 1 WHERE owner=?", (self.owner,))

    def _alive(self, owner: str, beat: float, now: float) -> bool:
        if owner == self.owner:
            return True
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host == self.host and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return now - beat < DEAD_AFTER

    def used(self, win: str, scope: str, own_spent: int | None = None) -> int:
        """Usage of a window as reported: live owners' spent, dead owners' reserved."""
        now = self.clock()
        total = 0
        for owner, reserved, spent, beat, closed in self.db.execute(
            "SELECT owner, reserved, spent, beat, closed FROM lease WHERE win=? AND scope=?", (win, scope)
        ):
            if owner == self.owner and own_spent is not None:
                total += own_spent
            elif closed or not self._alive(owner, beat, now):
                total += reserved
            else:
                total += spent
        return total

    def scopes(self, win: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT scope FROM lease WHERE win=?", (win,))]

    def counts(self, win: str) -> dict[tuple[str, str], int]:
        return {(c, cmd): n for c, cmd, n in self.db.execute("SELECT client, command, n FROM counts WHERE win=?", (win,))}

    def patterns(self, win: str) -> list[tuple[str, str, str, int, float, float]]:
        return list(
            self.db.execute("SELECT client, command, pattern, n, first, last FROM patterns WHERE win=?", (win,))
        )

    def saved(self, win: str) -> list[tuple[str, str, str, int, float, float]]:
        """(client, command, saver, n, first, last) of the commands savers answered in a window."""
        return list(
            self.db.execute("SELECT client, command, saver, n, first, last FROM saved WHERE win=?", (win,))
        )

    def alive_spans(self) -> list[tuple[float, float]]:
        """(first, last) flush time of every process that used this state directory."""
        out = []
        for (value,) in self.db.execute("SELECT value FROM meta WHERE key LIKE 'alive:%'"):
            try:
                a, b = value.split(",", 1)
                out.append((float(a), float(b)))
            except ValueError:
                continue
        return out

    def windows(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT win FROM counts UNION SELECT DISTINCT win FROM lease")]
