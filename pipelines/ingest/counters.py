"""Counts of skipped and converted images, gathered from the ingest workers by one small actor.

Skipped images produce no rows, so their counts cannot travel with the data; each reader
reports to this actor after every unit it reads, and the trainer reads a snapshot when it logs.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class IngestCounters:
    """Totals by reason: ``skipped`` (dropped images) and ``converted`` (e.g. CMYK -> RGB)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.skipped: dict[str, int] = {}
        self.converted: dict[str, int] = {}
        self.first_error = ""

    def add(self, delivered: int, skipped: dict[str, int], converted: dict[str, int], first_error: str = "") -> None:
        self.delivered += delivered
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        for mode, count in converted.items():
            self.converted[mode] = self.converted.get(mode, 0) + count
        if first_error and not self.first_error:
            self.first_error = first_error

    def snapshot(self) -> dict:
        return {
            "delivered": self.delivered,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "converted_by_mode": dict(self.converted),
            "first_error": self.first_error,
        }
