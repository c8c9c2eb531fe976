"""The Ray Data stream: planned read units -> decode -> augmented views -> uint8 rows.

``build_view_dataset`` returns a lazy ``ray.data.Dataset`` whose rows are images as the trainer
consumes them. The stream covers whole epochs laid end to end, so a worker iterates it once
for the whole run and every row says which epoch it belongs to; this is what makes per-epoch
shuffling and augmentation seeded and reproducible, and resuming mid-run cheap (start the plan
at the checkpointed epoch and unit).

* Shuffle: per epoch, the order of read units (Parquet row groups, tars, file chunks) is a
  permutation drawn from ``(seed, epoch)``, and rows are permuted within each unit; an optional
  local buffer in ``iter_torch_batches`` mixes further.
* Randomness: the views of a unit come from ``numpy`` generators seeded by
  ``(seed, epoch, unit)``, so they are new each epoch and identical on a rerun, whichever
  worker reads the unit.
* Exactly once: every (epoch, unit) appears once in the plan, and ``streaming_split`` hands each
  row to one worker.
* Bad data: reading and decoding failures are skipped and counted in
  :class:`~pipelines.ingest.ingest_state.IngestState`; nothing stops the stream.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import ray

from moco_core.image_io import ImageDecodeError
from pipelines.ingest.ingest_state import IngestState
from pipelines.ingest.sources import Collection, ColumnNames, ReadProblems, ReadUnit, read_unit

#: rows per block the readers emit (small blocks keep memory flat and batches flowing)
ROWS_PER_BLOCK = 32
#: cap on the plan's blocks (one unit per block below it)
MAX_PLAN_BLOCKS = 50_000


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream starts: an epoch and the position in that epoch's unit order."""

    epoch: int = 0
    unit_position: int = 0


def unit_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which units are read in ``epoch`` (a seeded permutation when shuffling)."""
    if not shuffle:
        return np.arange(num_units)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_units)


def plan_stream(
    num_units: int, end_epoch: int, seed: int, shuffle: bool, start: StreamPosition = StreamPosition()
) -> np.ndarray:
    """Rows ``(epoch, unit_position, unit)`` from ``start`` up to the end of ``end_epoch - 1``.

    Shape:
        -> (M, 3) int64
    """
    parts = []
    for epoch in range(start.epoch, end_epoch):
        order = unit_order(num_units, seed, epoch, shuffle)
        first = start.unit_position if epoch == start.epoch else 0
        positions = np.arange(first, num_units)
        parts.append(np.stack([np.full(len(positions), epoch), positions, order[positions]], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


class ViewFunction(Protocol):
    """Decodes ``bytes`` into uint8 HxWx3 views named ``columns`` (see pipelines.ingest.views).

    Returns (views, converted_from mode or None); raises ``ImageDecodeError`` for unusable bytes.
    """

    columns: tuple[str, ...]

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], str | None]: ...


class UnitReader:
    """Reads planned units and emits blocks of view rows (one plan row = one unit).

    Runs inside Ray Data tasks; :func:`_read_plan_rows` keeps one per worker process so the plan,
    the units and the transform are fetched and built once, not per task.

    Args:
        plan: rows ``(epoch, unit_position, unit)`` from :func:`plan_stream`.
        units: the collection's units.
        columns: Parquet column names.
        view_function: the per-image transform; its ``columns`` name the output views.
        seed: base seed of the run.
        shuffle_within_unit: permute rows inside each unit.
        ingest_state: the run's IngestState actor (counts, resume position).
    """

    def __init__(
        self,
        plan: np.ndarray,
        units: list[ReadUnit],
        columns: ColumnNames,
        view_function: ViewFunction,
        seed: int,
        shuffle_within_unit: bool,
        ingest_state: ray.actor.ActorHandle,
    ):
        self.plan = plan
        self.units = units
        self.columns = columns
        self.view_function = view_function
        self.seed = seed
        self.shuffle_within_unit = shuffle_within_unit
        self.ingest_state = ingest_state

    def read(self, plan_row: int) -> Iterator[dict[str, np.ndarray]]:
        epoch, position, unit_id = (int(value) for value in self.plan[plan_row])
        if epoch * len(self.units) + position < ray.get(self.ingest_state.get_resume_position.remote()):
            return  # consumed before a restart: pass over without reading
        rng = np.random.default_rng([self.seed, epoch, unit_id])
        problems = ReadProblems()
        images = list(read_unit(self.units[unit_id], self.columns, problems))
        order = rng.permutation(len(images)) if self.shuffle_within_unit else range(len(images))
        converted: dict[str, int] = {}
        rows: list[tuple] = []
        delivered = 0
        for row in order:
            image = images[row]
            try:
                views, converted_from = self.view_function(image.data, rng)
            except ImageDecodeError as error:
                problems.add(error.reason, image.key)
                continue
            if converted_from is not None:
                converted[converted_from] = converted.get(converted_from, 0) + 1
            rows.append((views, image.label, image.index))
            if len(rows) == ROWS_PER_BLOCK:
                delivered += len(rows)
                yield self._block(rows, epoch, position)
                rows = []
        if rows:
            delivered += len(rows)
            yield self._block(rows, epoch, position)
        self.ingest_state.add.remote(delivered, problems.counts, converted, problems.first_error)

    def _block(self, rows: list[tuple], epoch: int, position: int) -> dict[str, np.ndarray]:
        block = {
            name: np.stack([views[i] for views, _, _ in rows]) for i, name in enumerate(self.view_function.columns)
        }
        block["label"] = np.array([label for _, label, _ in rows], dtype=np.int64)
        block["index"] = np.array([index for _, _, index in rows], dtype=np.int64)
        block["epoch"] = np.full(len(rows), epoch, dtype=np.int64)
        block["unit_position"] = np.full(len(rows), position, dtype=np.int64)
        return block


#: readers of the streams this worker process served lately (a sweep builds many streams)
_readers: OrderedDict[str, UnitReader] = OrderedDict()
_READERS_KEPT = 4


def _read_plan_rows(batch: dict[str, np.ndarray], reader_id: str, shared: list, settings: dict) -> Iterator[dict]:
    """Ray Data task body: read the units of the plan rows in ``batch``."""
    reader = _readers.get(reader_id)
    if reader is None:
        # Refs nested in a list are not resolved by Ray: fetched here once per worker process.
        plan, units = ray.get(shared[0]), ray.get(shared[1])
        reader = _readers[reader_id] = UnitReader(plan, units, **settings)
        while len(_readers) > _READERS_KEPT:
            _readers.popitem(last=False)
    _readers.move_to_end(reader_id)
    for plan_row in batch["id"]:
        yield from reader.read(int(plan_row))


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data: our commands report progress."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Raised by Ray Train's own default ingest options; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*deprecated")


def build_view_dataset(
    collection: Collection,
    view_function: ViewFunction,
    *,
    end_epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    start: StreamPosition = StreamPosition(),
    readers: int = 1,
    ingest_state: ray.actor.ActorHandle | None = None,
) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """A lazy dataset of view rows covering epochs ``start.epoch .. end_epoch - 1``.

    Args:
        collection: from :func:`~pipelines.ingest.sources.plan_collection`.
        view_function: the per-image transform (pipelines.ingest.views), shipped to the readers.
        end_epoch: one past the last epoch in the stream.
        seed: run seed for the unit order, row order and augmentation.
        shuffle: shuffle units per epoch and rows per unit.
        start: where the stream begins (a resumed run starts at its checkpoint).
        readers: concurrent reader tasks (each uses one CPU).
        ingest_state: an existing IngestState actor; a new one is made when omitted.

    Returns:
        The dataset (columns: each view as uint8 HxWx3, ``label``, ``index``, ``epoch``,
        ``unit_position``) and the IngestState actor.
    """
    ingest_state = ingest_state or IngestState.remote()
    plan = plan_stream(len(collection.units), end_epoch, seed, shuffle, start)
    if len(plan) == 0:
        raise ValueError(f"empty stream: start {start} is at or past end_epoch {end_epoch}")
    # Plan rows are read lazily as indices; small blocks keep units close to plan order, so
    # the data in flight at any moment spans few units (this bounds re-reads after a resume).
    indices = ray.data.range(len(plan), override_num_blocks=min(len(plan), MAX_PLAN_BLOCKS))
    dataset = indices.map_batches(
        _read_plan_rows,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=readers),
        num_cpus=1,
        fn_kwargs={
            "reader_id": uuid.uuid4().hex,
            "shared": [ray.put(plan), ray.put(list(collection.units))],
            "settings": {
                "columns": collection.columns,
                "view_function": view_function,
                "seed": seed,
                "shuffle_within_unit": shuffle,
                "ingest_state": ingest_state,
            },
        },
    )
    return dataset, ingest_state
