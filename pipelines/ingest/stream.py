"""The Ray Data stream of views: planned read units -> shuffled groups -> lanes -> uint8 rows.

How a run's images reach its training workers (docs/DATA.md, "The stream"):

* **Epoch order.** Each epoch the read units (Parquet row groups, tars, single image files) are
  put in a new order drawn from ``(seed, epoch)``, and cut into *groups* of consecutive units
  holding about ``pool`` images. The rows of a group are read together and emitted in a random
  order, so every batch draws from many units, differently each epoch. A folder read directly
  has one file per unit, so it is shuffled globally.
* **Lanes.** Groups are dealt round-robin to ``workers x lanes_per_worker`` lanes (rotating by
  one each epoch). A lane is one long-running Ray Data task that reads its groups in order,
  reading the next group while it decodes the current one, and yields small blocks; a worker
  takes its lanes' blocks as they come (in runs of a few blocks per lane). Each training worker
  iterates its own lanes only: every image is delivered once per epoch, to one worker.
* **Positions.** Every row carries its lane and a position ``(epoch, group, offset)`` packed in
  one int64 that grows along the lane. A worker consumes each lane's rows in order, so the
  largest position it has consumed per lane says exactly what was trained on; a resumed stream
  starts every lane right after it (nothing seen twice, nothing skipped).
* **Randomness.** An image's two views in an epoch are drawn from a generator seeded by
  ``(seed, epoch, unit, row)`` alone: the same on a rerun or a resume, whatever the number of
  workers, lanes or groups.
* **Start-up** does not grow with the collection: the dataset has one row per lane; groups are
  worked out lazily inside the lanes from the compact unit table.
* **Failures.** A lane lost with its node is re-run by Ray Data, which replays it (a lane is
  deterministic) and passes on only the blocks not yet delivered; meanwhile the worker's other
  lanes keep it fed.
* **Bad data** is skipped and counted in :class:`~pipelines.ingest.ingest_state.IngestState`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import ray

from moco_core.image_io import ImageDecodeError
from pipelines.ingest.ingest_state import IngestState
from pipelines.ingest.sources import RawImage, ReadProblems, read_unit
from pipelines.ingest.units import Collection

#: bits of a position that hold the row offset within its group
OFFSET_BITS = 24
#: most bytes per block a lane yields: Ray Data's cost is per block, so small blocks are slow (at
#: 224 px, blocks of 4 rows made the stream ~25% slower than blocks of ~200; docs/BENCHMARKS.md)
BLOCK_BYTES = 64 << 20
#: most rows per block a lane yields
MAX_BLOCK_ROWS = 256
#: a block is at most this share of the object store, so a small store still holds many blocks
BLOCKS_PER_OBJECT_STORE = 64
#: longest single wait of a lane that is a window ahead (it then asks again): the wait returns as
#: soon as the consumer reports, so this only bounds a call to an actor that went away
CREDIT_WAIT_S = 5.0
#: images mixed in one group by default (their encoded bytes are held by the lane while it reads)
DEFAULT_POOL = 2048
_ORDER_SALT, _ROWS_SALT = 0x5EED, 0x6A5E
_PCG_INCREMENT = 0xDA3E39CB94B95BDB


class ViewFunction(Protocol):
    """Decodes ``bytes`` into uint8 HxWx3 views named ``columns`` (see pipelines.ingest.views).

    Returns (views, converted_from mode or None); raises ``ImageDecodeError`` for unusable bytes.
    ``bytes_per_row`` is the size of one row's views, used to size blocks.
    """

    columns: tuple[str, ...]
    bytes_per_row: int

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], str | None]: ...


@dataclass(frozen=True)
class StreamLayout:
    """How a run cuts its collection into groups and deals them to lanes; fixed for the run.

    Attributes:
        num_units: read units per epoch.
        units_per_group: consecutive units (in the epoch's order) read and shuffled together.
        workers: training workers; each iterates ``lanes_per_worker`` lanes.
        lanes_per_worker: concurrent reader tasks per worker.
        seed: the run's seed.
        shuffle: new unit order and row order every epoch (else storage order, for evaluation).
    """

    num_units: int
    units_per_group: int
    workers: int = 1
    lanes_per_worker: int = 1
    seed: int = 0
    shuffle: bool = True

    @property
    def total_lanes(self) -> int:
        return self.workers * self.lanes_per_worker

    @property
    def groups_per_epoch(self) -> int:
        return math.ceil(self.num_units / self.units_per_group)

    def unit_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of units (a seeded permutation when shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_units)
        return np.random.default_rng([self.seed, epoch, _ORDER_SALT]).permutation(self.num_units)

    def lane_of(self, epoch: int, group: int) -> int:
        """The global lane (``worker * lanes_per_worker + lane``) that reads ``group`` of ``epoch``."""
        return (group + epoch) % self.total_lanes

    def lane_groups(self, lane: int, epoch: int, first_group: int = 0) -> range:
        """The groups of ``epoch`` that ``lane`` reads, in order, from ``first_group`` on."""
        step = self.total_lanes
        first = (lane - epoch) % step
        if first_group > first:
            first += math.ceil((first_group - first) / step) * step
        return range(first, self.groups_per_epoch, step)

    def pack(self, epoch: int, group: int, offset: int) -> int:
        return ((epoch * self.groups_per_epoch + group) << OFFSET_BITS) | offset

    def unpack(self, position: int) -> tuple[int, int, int]:
        """(epoch, group, offset) of a packed position."""
        slot, offset = position >> OFFSET_BITS, position & ((1 << OFFSET_BITS) - 1)
        return slot // self.groups_per_epoch, slot % self.groups_per_epoch, offset


def plan_layout(
    collection: Collection,
    *,
    workers: int = 1,
    lanes_per_worker: int = 1,
    pool: int = DEFAULT_POOL,
    seed: int = 0,
    shuffle: bool = True,
) -> StreamLayout:
    """Group about ``pool`` images per group, with at least one group per lane each epoch where the
    collection allows it (tars, whose sizes are unknown, are one unit per group)."""
    num_units = len(collection.units)
    units_per_group = 1
    if collection.num_images and shuffle:
        rows_per_unit = max(1, round(collection.num_images / num_units))
        units_per_group = max(1, min(pool // rows_per_unit, num_units // (workers * lanes_per_worker)))
    return StreamLayout(num_units, units_per_group, workers, lanes_per_worker, seed, shuffle)


def restart_positions(layout: StreamLayout, saved: StreamLayout, positions: np.ndarray) -> np.ndarray:
    """Per-lane start positions in ``layout`` for a run saved with ``saved`` and ``positions``.

    The same layout resumes every lane exactly. Another layout (a different number of workers or
    readers) restarts every lane at the oldest group any lane was still reading: images of the
    groups in flight may be seen twice, none is skipped.

    Shape:
        positions: (saved.total_lanes,) int64, the last consumed position per lane (-1: none)
        -> (layout.total_lanes,) int64 in the same convention
    """
    if layout == saved:
        return positions.copy()
    oldest_epoch, oldest_unit = None, 0
    for lane, position in enumerate(positions.tolist()):
        if position >= 0:
            epoch, group, _ = saved.unpack(position)
        else:  # nothing consumed: the lane's first group of the first epoch is still unread
            first = saved.lane_groups(lane, 0)
            epoch, group = (0, first[0]) if len(first) else (1, 0)
        candidate = (epoch, group * saved.units_per_group)
        if oldest_epoch is None or candidate < (oldest_epoch, oldest_unit):
            oldest_epoch, oldest_unit = candidate
    assert oldest_epoch is not None
    group = oldest_unit // layout.units_per_group
    # "Last consumed" = the row before the first group to read: offset -1 of ``group`` is expressed
    # as a start group per lane below, so return the position just before each lane's first group.
    starts = np.empty(layout.total_lanes, dtype=np.int64)
    for lane in range(layout.total_lanes):
        first = layout.lane_groups(lane, oldest_epoch, group)
        epoch, first_group = (oldest_epoch, first[0]) if len(first) else (oldest_epoch + 1, 0)
        starts[lane] = layout.pack(epoch, first_group, 0) - 1
    return starts


class StreamProgress:
    """The last position consumed per lane, updated from every batch a worker trains on.

    All workers' vectors combine with an element-wise max (each lane belongs to one worker).
    """

    def __init__(self, total_lanes: int, positions: np.ndarray | None = None):
        self.positions = np.full(total_lanes, -1, dtype=np.int64) if positions is None else positions.copy()

    def consume(self, lanes: np.ndarray, positions: np.ndarray) -> None:
        np.maximum.at(self.positions, lanes, positions)


def _row_states(seed: int, epoch: int, units: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A 128-bit PCG64 state per image, hashed from ``(seed, epoch, unit, row)`` (splitmix64).

    Shape:
        units, rows: (N,) -> (N, 2) uint64 (high, low)
    """

    def mix(values: np.ndarray) -> np.ndarray:
        values = values + np.uint64(0x9E3779B97F4A7C15)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))

    with np.errstate(over="ignore"):
        base = mix(mix(np.full(len(units), seed, dtype=np.uint64)) ^ np.uint64(epoch))
        identity = (units.astype(np.uint64) << np.uint64(OFFSET_BITS)) ^ rows.astype(np.uint64)
        high = mix(base ^ identity)
        low = mix(high ^ np.uint64(0xD1B54A32D192ED03))
    return np.stack([high, low], axis=1)


class _RowGenerator:
    """One numpy Generator re-seeded per image from a precomputed state (a few microseconds,
    against tens for building a seeded Generator)."""

    def __init__(self) -> None:
        self.generator = np.random.Generator(np.random.PCG64(0))

    def reseed(self, high: int, low: int) -> np.random.Generator:
        self.generator.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (high << 64) | low, "inc": _PCG_INCREMENT},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self.generator


@dataclass(frozen=True)
class _Group:
    epoch: int
    group: int
    first_offset: int  # rows before it were consumed before a resume: not decoded again
    units: np.ndarray


class LaneReader:
    """Reads one lane's groups and yields blocks of view rows (runs inside a Ray Data task).

    Args:
        collection: the planned collection (its unit table).
        layout: the run's stream layout.
        view_function: the per-image transform; its ``columns`` name the output views.
        ingest_state: the run's IngestState actor (counts of delivered, skipped, converted).
        rows_per_block: rows per yielded block.
    """

    def __init__(
        self,
        collection: Collection,
        layout: StreamLayout,
        view_function: ViewFunction,
        ingest_state: ray.actor.ActorHandle,
        rows_per_block: int,
        stream_id: str,
        window_rows: int | None,
    ):
        self.collection = collection
        self.layout = layout
        self.view_function = view_function
        self.ingest_state = ingest_state
        self.rows_per_block = rows_per_block
        self.stream_id = stream_id
        self.window_rows = window_rows
        self._orders: dict[int, np.ndarray] = {}
        self._emitted = 0
        self._known_consumed = 0

    def _wait_for_credit(self, lane: int) -> None:
        """Block while this lane is ``window_rows`` ahead of what the consumer has taken."""
        while self.window_rows is not None and self._emitted - self._known_consumed >= self.window_rows:
            self._known_consumed = ray.get(
                self.ingest_state.wait_consumed.remote(
                    self.stream_id, lane, self._emitted - self.window_rows, CREDIT_WAIT_S
                )
            )

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.layout.unit_order(epoch)}  # one epoch at a time per lane
        return self._orders[epoch]

    def schedule(self, lane: int, last_consumed: int, end_epoch: int | None) -> Iterator[_Group]:
        """The lane's groups after position ``last_consumed`` (-1: from the start), in order."""
        layout, size = self.layout, self.layout.units_per_group
        epoch, group, offset = layout.unpack(last_consumed + 1) if last_consumed >= 0 else (0, 0, 0)
        resume_group = group if last_consumed >= 0 and layout.lane_of(epoch, group) == lane else None
        while end_epoch is None or epoch < end_epoch:
            order = self._order(epoch)
            for current in layout.lane_groups(lane, epoch, group):
                first = offset if current == resume_group else 0
                yield _Group(epoch, current, first, order[current * size : (current + 1) * size])
            epoch, group, resume_group = epoch + 1, 0, None

    def _read(self, group: _Group) -> tuple[list[RawImage], np.ndarray, ReadProblems]:
        """The group's images, in the order they are emitted, and the unit of each."""
        problems = ReadProblems()
        images: list[RawImage] = []
        units: list[int] = []
        for unit in group.units.tolist():
            for image in read_unit(self.collection.units, unit, self.collection.columns, problems):
                images.append(image)
                units.append(unit)
        unit_array = np.array(units, dtype=np.int64)
        if self.layout.shuffle:
            order = np.random.default_rng([self.layout.seed, group.epoch, group.group, _ROWS_SALT]).permutation(
                len(images)
            )
            images = [images[i] for i in order]
            unit_array = unit_array[order]
        return images, unit_array, problems

    def blocks(self, lane: int, last_consumed: int, end_epoch: int | None) -> Iterator[dict[str, np.ndarray]]:
        """Blocks of rows of ``lane`` after ``last_consumed``, up to ``end_epoch`` (None: forever)."""
        schedule = self.schedule(lane, last_consumed, end_epoch)
        generator = _RowGenerator()
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            current = next(schedule, None)
            pending = prefetch.submit(self._read, current) if current is not None else None
            while current is not None and pending is not None:
                images, units, problems = pending.result()
                following = next(schedule, None)  # read ahead while this group is decoded
                pending = prefetch.submit(self._read, following) if following is not None else None
                yield from self._decode(current, lane, images, units, problems, generator)
                current = following

    def _decode(
        self,
        group: _Group,
        lane: int,
        images: list[RawImage],
        units: np.ndarray,
        problems: ReadProblems,
        generator: _RowGenerator,
    ) -> Iterator[dict[str, np.ndarray]]:
        states = _row_states(self.layout.seed, group.epoch, units, np.array([image.row for image in images]))
        base = self.layout.pack(group.epoch, group.group, 0)
        converted: dict[str, int] = {}
        rows: list[tuple[tuple[np.ndarray, ...], int, int, int]] = []
        delivered = 0
        for offset in range(group.first_offset, len(images)):
            image = images[offset]
            rng = generator.reseed(int(states[offset, 0]), int(states[offset, 1]))
            try:
                views, converted_from = self.view_function(image.data, rng)
            except ImageDecodeError as error:
                problems.add(error.reason, image.key)
                continue
            if converted_from is not None:
                converted[converted_from] = converted.get(converted_from, 0) + 1
            rows.append((views, image.label, image.index, base + offset))
            if len(rows) == self.rows_per_block:
                delivered += len(rows)
                yield self._block(rows, group.epoch, lane)
                rows = []
        # Counted before the group's last rows leave, so a consumer holding them sees the counts.
        ray.get(self.ingest_state.add.remote(delivered + len(rows), problems.counts, converted, problems.first_error))
        if rows:
            yield self._block(rows, group.epoch, lane)

    def _block(self, rows: list[tuple], epoch: int, lane: int) -> dict[str, np.ndarray]:
        self._wait_for_credit(lane)
        self._emitted += len(rows)
        block = {name: np.stack([row[0][i] for row in rows]) for i, name in enumerate(self.view_function.columns)}
        block["label"] = np.array([row[1] for row in rows], dtype=np.int64)
        block["index"] = np.array([row[2] for row in rows], dtype=np.int64)
        block["epoch"] = np.full(len(rows), epoch, dtype=np.int64)
        block["lane"] = np.full(len(rows), lane, dtype=np.int64)
        block["position"] = np.array([row[3] for row in rows], dtype=np.int64)
        return block


def _run_lanes(
    batch: dict[str, np.ndarray], shared: list, settings: dict, end_epoch: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task body: one lane (``batch`` holds one lane id and its last consumed position)."""
    # A ref nested in a list is not resolved by Ray: fetched here, once per lane.
    reader = LaneReader(ray.get(shared[0]), **settings)
    node = ray.get_runtime_context().get_node_id()
    for lane, last_consumed in zip(batch["lane"].tolist(), batch["last_consumed"].tolist()):
        reader.ingest_state.lane_started.remote(lane, node)
        yield from reader.blocks(lane, last_consumed, end_epoch)


def rows_per_block(
    view_function: ViewFunction, window_rows: int | None = None, object_store_bytes: float | None = None
) -> int:
    """Rows per block a lane yields: as many as fit in ``BLOCK_BYTES`` (and in
    ``1 / BLOCKS_PER_OBJECT_STORE`` of the object store), at most ``MAX_BLOCK_ROWS``, and at most a
    quarter of the lane's window (Ray Data holds back up to a block of a lane's rows until the next
    one comes: a window of several blocks keeps the lane ahead of the consumer)."""
    block_bytes = (
        BLOCK_BYTES
        if object_store_bytes is None
        else min(BLOCK_BYTES, int(object_store_bytes) // BLOCKS_PER_OBJECT_STORE)
    )
    rows = int(np.clip(block_bytes // max(1, view_function.bytes_per_row), 1, MAX_BLOCK_ROWS))
    return rows if window_rows is None else max(1, min(rows, window_rows // 4))


@dataclass(frozen=True)
class ViewStream:
    """One worker's lanes as a Ray Data dataset, and what its consumer reports back.

    Attributes:
        dataset: rows with each view (uint8 HxWx3), ``label``, ``index``, ``epoch``, ``lane``,
            ``position``.
        ingest_state: the IngestState actor (counts; the consumer's progress per lane).
        stream_id: names this stream in ``ingest_state``.
        layout: the stream layout.
    """

    dataset: ray.data.Dataset
    ingest_state: ray.actor.ActorHandle
    stream_id: str
    layout: StreamLayout

    def training_batches(
        self, batch_size: int, progress: StreamProgress, pin_memory: bool = False
    ) -> Generator[dict, None, None]:
        """Torch batches; each one, as it is handed out, counts as consumed: ``progress`` records
        its positions and the lanes are told, so they may run ahead by their window.

        Batches stay in host memory, where the positions are read (in a Ray Train worker Ray
        Data would otherwise move every column to the worker's GPU). ``pin_memory`` (for a CUDA
        trainer) pins them in Ray Data's formatting thread, so the trainer's copy to the GPU
        does not wait for the GPU to finish its queued work, as a copy from pageable memory does.

        Batches come in the order their rows left the lanes, which the positions rely on (the
        largest one consumed per lane marks everything before it as trained on). Ray Data formats
        ``prefetch_batches`` batches in as many threads and, unless the whole dataset preserves
        order (which would hold every lane but the first back until that one ends), hands them
        out as they finish: with two, a batch could overtake the one before it and a restart
        would skip the overtaken rows. So one batch is prefetched and formatted at a time."""
        consumed = np.zeros(self.layout.total_lanes, dtype=np.int64)
        iterator = iter(
            self.dataset.iter_torch_batches(
                batch_size=batch_size, prefetch_batches=1, device="cpu", pin_memory=pin_memory
            )
        )
        try:
            for batch in iterator:
                lanes = batch["lane"].numpy()
                progress.consume(lanes, batch["position"].numpy())
                np.add.at(consumed, lanes, 1)
                self.ingest_state.report_consumed.remote(
                    self.stream_id, {int(lane): int(consumed[lane]) for lane in np.unique(lanes)}
                )
                yield batch
        finally:
            iterator.close()  # stops the lanes (a training stream never ends by itself)


def lane_window(layout: StreamLayout, batch_size: int, prefetch_batches: int = 2) -> int:
    """Rows a lane may run ahead of training: the worker's lanes together hold the batches in
    its prefetch buffer plus four more."""
    return max(1, math.ceil((prefetch_batches + 5) * batch_size / layout.lanes_per_worker))


def build_view_dataset(
    collection: Collection | ray.ObjectRef,
    view_function: ViewFunction,
    layout: StreamLayout,
    *,
    worker: int = 0,
    positions: np.ndarray | None = None,
    end_epoch: int | None = None,
    ingest_state: ray.actor.ActorHandle | None = None,
    lane_cpus: float = 1.0,
    lane_resources: Mapping[str, float] | None = None,
    window_rows: int | None = None,
) -> ViewStream:
    """A lazy stream of ``worker``'s view rows: its lanes, from ``positions`` on.

    Args:
        collection: from :func:`~pipelines.ingest.planning.plan_collection` (or its object ref).
        view_function: the per-image transform (pipelines.ingest.views), shipped to the lanes.
        layout: from :func:`plan_layout`.
        worker: which worker's lanes to read.
        positions: last consumed position per global lane (from :class:`StreamProgress` or
            :func:`restart_positions`); None starts from the beginning.
        end_epoch: one past the last epoch; None streams until the consumer stops.
        ingest_state: an existing IngestState actor; a new one is made when omitted.
        lane_cpus: CPUs each lane reserves. Lanes run for the whole stream and all of them must
            fit at once; a stream read while another one is paused (evaluation during training)
            reserves 0.
        lane_resources: custom Ray resources each lane requests besides its CPUs (e.g.
            ``{"ingest": 1}``): the lanes run only on nodes that carry them
            (:mod:`pipelines.ingest.placement`).
        window_rows: how far a lane may run ahead of what :meth:`ViewStream.training_batches`
            has handed out (:func:`lane_window`); None: as far as Ray Data's buffers allow (a
            bounded stream, or a consumer that reads the dataset directly).
    """
    ingest_state = ingest_state or IngestState.remote()
    stream_id = uuid.uuid4().hex
    lanes = np.arange(worker * layout.lanes_per_worker, (worker + 1) * layout.lanes_per_worker)
    last = np.full(len(lanes), -1, dtype=np.int64) if positions is None else np.asarray(positions)[lanes]
    block_rows = rows_per_block(view_function, window_rows, ray.cluster_resources().get("object_store_memory"))
    context = ray.data.DataContext.get_current()
    saved_block_size = context.target_max_block_size
    # Without this, Ray Data would merge a lane's yields into blocks of up to 128 MB, so nothing
    # would reach the trainer until a lane had produced that much. The dataset seals a copy.
    context.target_max_block_size = max(1, int(0.7 * block_rows * view_function.bytes_per_row))
    # Ray Data's per-operator reservation would hold back all lanes but one until it finished,
    # and a lane finishes only with the stream: every lane must run from the start. (Without it
    # Ray Data reads a lane's blocks as fast as they come: ``window_rows`` bounds a lane instead.)
    saved_reservation = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    # Nor may Ray Data hold back the lanes' finished blocks for a consumer that prefetches one
    # batch: its executor would find them ready on every ray.wait and spin on a CPU the trainer
    # needs (2.4x slower at 32 px on 2 cores; docs/BENCHMARKS.md). The window bounds them.
    saved_downstream_ratio = context.downstream_capacity_backpressure_ratio
    context.downstream_capacity_backpressure_ratio = None
    try:
        seeds = ray.data.from_items(
            [{"lane": int(lane), "last_consumed": int(position)} for lane, position in zip(lanes, last)],
            override_num_blocks=len(lanes),
        )
        shared_collection = collection if isinstance(collection, ray.ObjectRef) else ray.put(collection)
        dataset = seeds.map_batches(
            _run_lanes,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=len(lanes)),
            num_cpus=lane_cpus,
            **({"resources": dict(lane_resources)} if lane_resources else {}),
            fn_kwargs={
                "shared": [shared_collection],
                "end_epoch": end_epoch,
                "settings": {
                    "layout": layout,
                    "view_function": view_function,
                    "ingest_state": ingest_state,
                    "rows_per_block": block_rows,
                    "stream_id": stream_id,
                    "window_rows": window_rows,
                },
            },
        )
    finally:
        context.target_max_block_size = saved_block_size
        context.op_resource_reservation_enabled = saved_reservation
        context.downstream_capacity_backpressure_ratio = saved_downstream_ratio
    return ViewStream(dataset, ingest_state, stream_id, layout)


class TrainingStreamPlan(Protocol):
    """What a training worker's plan (pretraining's, the full probe's) carries for its stream."""

    collection: Collection | ray.ObjectRef
    train_view: ViewFunction
    layout: StreamLayout
    ingest_state: ray.actor.ActorHandle
    lane_cpus: float
    lane_resources: Mapping[str, float]


def worker_training_batches(
    plan: TrainingStreamPlan, progress: StreamProgress, *, worker: int, batch_size: int, pin_memory: bool = False
) -> Generator[dict, None, None]:
    """A training worker's batches: its lanes from ``progress``'s positions on, each lane allowed
    :func:`lane_window` rows ahead of what the worker has taken (pretraining, the full probe);
    ``pin_memory`` as in :meth:`ViewStream.training_batches`."""
    stream = build_view_dataset(
        plan.collection,
        plan.train_view,
        plan.layout,
        worker=worker,
        positions=progress.positions,
        ingest_state=plan.ingest_state,
        lane_cpus=plan.lane_cpus,
        lane_resources=plan.lane_resources,
        window_rows=lane_window(plan.layout, batch_size),
    )
    return stream.training_batches(batch_size, progress, pin_memory)
