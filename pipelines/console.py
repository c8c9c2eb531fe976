"""Human-facing output: progress and notes on stderr, so stdout stays clean for results."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_debug = False
_sink: Callable[[str], None] | None = None


def set_debug(enabled: bool) -> None:
    """``--debug``: tracebacks on errors, and Ray's and MLflow's own log lines on the terminal."""
    global _debug
    _debug = enabled


def debug_enabled() -> bool:
    return _debug


def send_notes_to(sink: Callable[[str], None] | None) -> None:
    """Route this process's :func:`note` lines to ``sink`` (a Ray worker sends them to the driver,
    which prints them: the worker's own stderr goes to Ray's log files); None: back to stderr."""
    global _sink
    _sink = sink


def note(message: str, stream: TextIO | None = None) -> None:
    """One line of progress or information on stderr (or where :func:`send_notes_to` says).

    Written to the stream directly: inside Ray Train workers ``print`` is patched to also log,
    which would show every line twice.
    """
    if stream is None and _sink is not None:
        _sink(message)
        return
    stream = stream or sys.stderr
    stream.write(message + "\n")
    stream.flush()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Throttled ``label: done/total (pct) rate ETA`` lines on stderr for long work.

    Args:
        label: what is being counted, e.g. ``"bench step: moco"``.
        total: expected count, if known (enables percent and ETA).
        unit: name of one item, e.g. ``"img"``.
        min_interval: seconds between printed lines; the final line always prints.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "it",
        min_interval: float = 2.0,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.min_interval = min_interval
        self.stream = stream
        self.start = time.monotonic()
        self._last_print = 0.0

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.min_interval:
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{self.label}: {done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts.append(f"({100.0 * done / self.total:.0f}%)")
        parts.append(f"{done / elapsed:.1f} {self.unit}/s")
        if self.total and done:
            parts.append(f"ETA {format_duration(elapsed * (self.total - done) / done)}")
        if extra:
            parts.append(extra)
        note(" ".join(parts), self.stream)

    def finish(self, done: int, extra: str = "") -> None:
        self.update(done, extra, force=True)
