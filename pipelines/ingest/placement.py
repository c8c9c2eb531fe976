"""How many reader lanes a run gets, how many CPUs each reserves, and on which nodes they may run.

By default the lanes share the cluster's CPUs with the trainer. On a cluster whose GPU machines
cannot decode and augment as fast as their GPUs train (docs/CLUSTER.md), CPU-only nodes started
with a custom resource (e.g. ``ingest``) carry the readers: ``data.reader_resources`` makes every
lane request that resource, so Ray runs lanes only there and the lanes stream their views to the
GPU workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.config import ConfigError


@dataclass(frozen=True)
class ReaderLanes:
    """Attributes:
    per_worker: lanes each training worker iterates.
    cpus: CPUs each lane reserves (every lane runs for the whole run, so all must fit at once).
    resources: the custom resources each lane requests besides its CPUs (pins lanes to nodes).
    """

    per_worker: int
    cpus: float
    resources: dict[str, float]


def reader_lanes(
    *,
    readers: int,
    workers: int,
    trainer_cpus: float,
    trainer_uses_gpus: bool,
    cluster_cpus: float,
    reader_resources: Mapping[str, float],
    nodes: Sequence[Mapping[str, Any]] = (),
) -> ReaderLanes:
    """The lanes of a run. ``readers`` lanes in all (0: one per CPU the readers can have, at
    least one per worker).

    Without ``reader_resources`` the readers have the cluster's CPUs less the trainer's. With
    them, the readers have the CPUs of the live ``nodes`` (``ray.nodes()``) carrying those
    resources, less the trainer's when the trainer could run there too (CPU training, or GPUs on
    those nodes), and at most as many lanes as those resources admit at once. When no node
    carries them yet (an autoscaling cluster starts reader nodes on demand), ``readers`` must be
    given, and each lane reserves one CPU.

    Raises:
        ConfigError: no CPU would be left for the readers, or reader nodes cannot be counted.
    """
    wanted = dict(reader_resources)
    if not wanted:
        free = cluster_cpus - trainer_cpus
        lanes = readers or max(workers, int(free))
        per_worker = max(1, lanes // workers)
        return ReaderLanes(per_worker, min(1.0, free / (per_worker * workers)), wanted)

    carrying = [
        node["Resources"]
        for node in nodes
        if node.get("Alive", True) and all(node["Resources"].get(name, 0) >= amount for name, amount in wanted.items())
    ]
    if not carrying:
        if readers:
            return ReaderLanes(max(1, readers // workers), 1.0, wanted)
        raise ConfigError(
            f"data.reader_resources={wanted}: no node of the cluster carries these resources yet; start reader "
            "nodes with them (an autoscaling cluster starts them on demand when data.readers gives the number "
            "of reader lanes)"
        )
    cpus = sum(node.get("CPU", 0) for node in carrying)
    if not trainer_uses_gpus or any(node.get("GPU", 0) for node in carrying):
        cpus -= trainer_cpus  # the trainer may be placed on these nodes too
    if cpus <= 0:
        raise ConfigError(
            f"the nodes carrying data.reader_resources={wanted} have no CPU left for the readers once the "
            f"trainer's {trainer_cpus:g} are reserved; add reader nodes or lower --cpus-per-worker"
        )
    # Lanes the nodes can run at once: a lane needs all of its resources on one node.
    capacity = sum(min(math.floor(node.get(name, 0) / amount) for name, amount in wanted.items()) for node in carrying)
    lanes = readers or max(workers, min(int(cpus), capacity))
    if not readers and lanes > capacity:
        raise ConfigError(
            f"the nodes carrying data.reader_resources={wanted} run {capacity} reader lane(s) at once, and each "
            f"of the {workers} workers needs at least one; add reader nodes or give them more of these resources"
        )
    per_worker = max(1, lanes // workers)
    return ReaderLanes(per_worker, min(1.0, cpus / (per_worker * workers)), wanted)
