"""Our workers' progress on the driver's terminal, and the step a job has reached.

Ray's own worker output stays in Ray's log files (:mod:`pipelines.ray_runtime`), so what our
workers :func:`~pipelines.console.note` is sent to a small actor instead, and the driver prints
it while it waits for the job (:func:`run_watched`). The actor also holds the newest step rank 0
has finished, which an interrupted run reports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from pipelines.console import note, send_notes_to

T = TypeVar("T")

#: How often the driver prints what the workers sent (seconds).
RELAY_INTERVAL_S = 0.5


@ray.remote(num_cpus=0)
class RunConsole:
    """Lines noted by the workers, not yet printed, and the newest step finished."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._step: int | None = None

    def note(self, line: str) -> None:
        self._lines.append(line)

    def reached(self, step: int) -> None:
        self._step = step

    def take(self) -> tuple[list[str], int | None]:
        """The lines noted since the last call, and the newest step (None before the first)."""
        lines, self._lines = self._lines, []
        return lines, self._step


def forward_notes(console: Any) -> None:
    """In a worker: send this process's notes to ``console`` (a :class:`RunConsole` handle)."""
    send_notes_to(lambda line: console.note.remote(line))


class ConsoleRelay:
    """The driver's side: prints what the workers noted, and remembers the newest step.

    Args:
        console: the job's :class:`RunConsole` handle.
        step: the step the job starts at (a resumed run's), until the workers report one.
    """

    def __init__(self, console: Any, step: int = 0):
        self.console = console
        self.step = step

    def relay(self, timeout: float = 10.0) -> None:
        try:
            lines, step = ray.get(self.console.take.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:  # a busy node: the lines come with the next call
            return
        if step is not None:
            self.step = step
        for line in lines:
            note(line)


def run_watched(function: Callable[[], T], relay: ConsoleRelay) -> T:
    """``function()`` on a thread while this thread prints the workers' notes; its result or error.

    The job runs off the main thread so that Ctrl-C raises KeyboardInterrupt here, where the
    caller decides what to stop and report (Ray Train installs its own SIGINT handler only when
    it runs on the main thread).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 -- handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="moco-job", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(RELAY_INTERVAL_S)
        relay.relay()
    relay.relay()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
