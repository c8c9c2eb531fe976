"""Shared state of one ingest stream, held by a small actor: counts of skipped and converted
images, and where a restarted stream should resume.

Skipped images produce no rows, so their counts cannot travel with the data; each reader
reports here after every unit it reads, and the trainer reads a snapshot when it logs. After a
worker-group restart the dataset runs again from its first unit; the trainer sets the resume
position here first, and readers pass over units before it without reading them.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class IngestState:
    """Totals by reason (``skipped``: dropped images; ``converted``: e.g. CMYK -> RGB) and the
    stream position (in units over all epochs) below which readers skip."""

    def __init__(self) -> None:
        self.delivered = 0
        self.skipped: dict[str, int] = {}
        self.converted: dict[str, int] = {}
        self.first_error = ""
        self.resume_position = 0

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

    def set_resume_position(self, position: int) -> None:
        self.resume_position = position

    def get_resume_position(self) -> int:
        return self.resume_position
