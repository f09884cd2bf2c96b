"""What ``--savers`` / ``[savers]`` / ``RESPMETER_SAVERS`` choose (proxy.savers runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

NAMES = ("poll", "events", "ping", "handshake", "sweeps")
# The celery preset is every saver. sweeps is in it: kombu ignores the sweep's result, and a
# binding table lives at least an hour, so sweeping every 10 minutes instead of every minute only
# delays the clean-up of a stopped consumer's bindings by minutes on an hour's scale.
PRESETS = {"celery": NAMES}
DEFAULT_CHANNELS = ("*celeryev/worker.heartbeat",)


class SaverConfigError(ValueError):
    pass


def parse_savers(text: str | Iterable[str]) -> frozenset[str]:
    """``celery``, ``poll,ping``, ``none`` or '' (a comma-separated string or a list)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: set[str] = set()
    unknown = []
    for raw in items:
        item = raw.strip().lower()
        if not item or item == "none":
            continue
        if item in PRESETS:
            out.update(PRESETS[item])
        elif item in NAMES:
            out.add(item)
        else:
            unknown.append(repr(raw.strip()))
    if unknown:
        raise SaverConfigError(
            f"unknown saver{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (expected the preset "
            f"{', '.join(PRESETS)}, or some of: {', '.join(NAMES)}; or none)"
        )
    return frozenset(out)


def savers_type(text: str) -> str:
    """The ``--savers`` option's type: checked, kept as given."""
    try:
        parse_savers(text)
    except SaverConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass
class SaverConfig:
    enabled: frozenset[str] = frozenset()
    hold: float = 300.0  # poll: upstream timeout of the held blocking pop
    recheck: float = 60.0  # events: a watched PUBLISH goes upstream at least this often
    channels: tuple[str, ...] = DEFAULT_CHANNELS  # events: globs of the channels watched
    sweep_every: float = 600.0  # sweeps: a sweep goes upstream at most this often
    keep: float = 1.0  # poll: an item no client took goes back after this long

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        parts = []
        for name in NAMES:
            if name not in self.enabled:
                continue
            if name == "poll":
                parts.append(f"poll (hold {self.hold:g}s)")
            elif name == "events":
                parts.append(f"events ({', '.join(self.channels)}; recheck {self.recheck:g}s)")
            elif name == "sweeps":
                parts.append(f"sweeps (every {self.sweep_every:g}s)")
            else:
                parts.append(name)
        return ", ".join(parts)
