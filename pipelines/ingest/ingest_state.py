"""Shared state of a run's ingest, held by a small actor: counts of images delivered, skipped and
converted, and how far each reader lane may run ahead of training.

Skipped images produce no rows, so their counts cannot travel with the data; each lane reports
here after every group it reads, and the trainer reads a snapshot when it logs. The trainer also
posts how many rows of each lane it has consumed; a lane that is a window ahead waits for it in one
long call (:meth:`IngestState.wait_consumed`), not by polling, so a cluster's lanes cost the actor a
call per batch consumed, not a call per lane every few milliseconds.
Each lane records the node it runs on (where ``data.reader_resources`` placed it).
"""

from __future__ import annotations

import asyncio

import ray


@ray.remote(num_cpus=0)
class IngestState:
    """Totals by reason (``skipped``: dropped images; ``converted``: e.g. CMYK -> RGB)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.skipped: dict[str, int] = {}
        self.converted: dict[str, int] = {}
        self.first_error = ""
        self.consumed_rows: dict[tuple[str, int], int] = {}  # (stream id, lane) -> rows consumed
        self.lane_nodes: dict[int, list[str]] = {}  # lane -> the Ray nodes it ran on, in order
        self._reported: dict[str, asyncio.Event] = {}  # stream id -> set at its next report

    def add(self, delivered: int, skipped: dict[str, int], converted: dict[str, int], first_error: str = "") -> None:
        self.delivered += delivered
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        for mode, count in converted.items():
            self.converted[mode] = self.converted.get(mode, 0) + count
        if first_error and not self.first_error:
            self.first_error = first_error

    async def report_consumed(self, stream: str, rows_by_lane: dict[int, int]) -> None:
        """The consumer of ``stream`` has consumed this many rows of each lane so far."""
        for lane, rows in rows_by_lane.items():
            self.consumed_rows[(stream, lane)] = rows
        reported = self._reported.pop(stream, None)
        if reported is not None:
            reported.set()  # wakes this stream's waiting lanes

    def lane_started(self, lane: int, node_id: str) -> None:
        """A reader lane started (or was re-run) on Ray node ``node_id``."""
        nodes = self.lane_nodes.setdefault(lane, [])
        if node_id not in nodes:
            nodes.append(node_id)

    def _consumed(self, stream: str, lane: int) -> int:
        return self.consumed_rows.get((stream, lane), 0)

    async def wait_consumed(self, stream: str, lane: int, beyond: int, timeout_s: float) -> int:
        """The rows of ``lane`` consumed, once they exceed ``beyond`` or ``timeout_s`` has passed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._consumed(stream, lane) <= beyond:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            reported = self._reported.setdefault(stream, asyncio.Event())
            try:
                await asyncio.wait_for(reported.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        return self._consumed(stream, lane)

    def snapshot(self) -> dict:
        return {
            "delivered": self.delivered,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "converted_by_mode": dict(self.converted),
            "first_error": self.first_error,
            "reader_nodes": sorted({node for nodes in self.lane_nodes.values() for node in nodes}),
        }
