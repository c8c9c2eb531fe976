"""The Ray Data view stream: exactly once per epoch, batches that mix the collection, views seeded
by image alone, exact resume, bad data counted, bounded memory."""

import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import ray

from moco_core.augment import AugmentConfig, CenterCropTransform
from pipelines.ingest.ingest_state import IngestState
from pipelines.ingest.planning import plan_collection
from pipelines.ingest.stream import (
    StreamLayout,
    StreamProgress,
    build_view_dataset,
    lane_window,
    plan_layout,
    restart_positions,
    rows_per_block,
)
from pipelines.ingest.views import EvalViewFunction, TwoViewFunction
from tests.pipelines.fixtures import jpeg_bytes, write_image_folder, write_img2dataset_parquet

SMALL_VIEWS = TwoViewFunction(AugmentConfig(recipe="v2", size=16))
TINY_VIEWS = TwoViewFunction(AugmentConfig(recipe="cifar", size=8))


@pytest.fixture(scope="module")
def parquet_collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    for shard in range(3):
        write_img2dataset_parquet(root / f"{shard:05d}.parquet", 20, rows_per_group=8, start_seed=20 * shard)
    return plan_collection(str(root))  # 60 images in 9 row groups


@pytest.fixture(scope="module")
def mixing_collection(tmp_path_factory):
    """512 images in 64 row groups of 8."""
    root = tmp_path_factory.mktemp("mixing")
    for shard in range(16):
        write_img2dataset_parquet(root / f"{shard:05d}.parquet", 32, rows_per_group=8, start_seed=32 * shard)
    return plan_collection(str(root))


def _rows(dataset, batch_size: int = 16) -> list[dict]:
    rows = []
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        rows.extend({name: batch[name][i] for name in batch} for i in range(len(batch["index"])))
    return rows


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize(
    ("num_units", "units_per_group", "workers", "lanes"), [(9, 2, 2, 1), (64, 3, 2, 3), (5, 1, 4, 2)]
)
def test_every_group_goes_to_one_lane_per_epoch(num_units, units_per_group, workers, lanes):
    layout = StreamLayout(num_units, units_per_group, workers, lanes, seed=1)
    for epoch in range(3):
        dealt = sorted(group for lane in range(layout.total_lanes) for group in layout.lane_groups(lane, epoch))
        assert dealt == list(range(layout.groups_per_epoch))
        assert all(
            layout.lane_of(epoch, group) == lane
            for lane in range(layout.total_lanes)
            for group in layout.lane_groups(lane, epoch)
        )
        order = layout.unit_order(epoch)
        assert sorted(order.tolist()) == list(range(num_units))
    assert not np.array_equal(layout.unit_order(0), layout.unit_order(1))
    assert layout.unpack(layout.pack(5, layout.groups_per_epoch - 1, 12345)) == (5, layout.groups_per_epoch - 1, 12345)


def test_groups_hold_about_the_pool_and_every_lane_gets_work(parquet_collection):
    assert plan_layout(parquet_collection, pool=16).units_per_group == 2  # 60 images in 9 units: ~7 per unit
    assert plan_layout(parquet_collection, workers=2, lanes_per_worker=2, pool=1000).units_per_group == 2  # 9 // 4
    assert plan_layout(parquet_collection, shuffle=False).units_per_group == 1


# ----------------------------------------------------------------------------- delivery


def test_two_workers_get_every_image_exactly_once_per_epoch(ray_cluster, parquet_collection):
    layout = plan_layout(parquet_collection, workers=2, lanes_per_worker=1, pool=16, seed=3)
    per_worker = []
    for worker in range(2):
        dataset = build_view_dataset(parquet_collection, SMALL_VIEWS, layout, worker=worker, end_epoch=2).dataset
        per_worker.append([(int(row["epoch"]), int(row["index"])) for row in _rows(dataset)])
    first, second = per_worker
    assert not set(first) & set(second)
    assert len(first) + len(second) == 120
    for epoch in (0, 1):
        assert sorted(index for e, index in first + second if e == epoch) == list(range(60))


def test_batches_mix_the_collection_like_a_global_shuffle(ray_cluster, mixing_collection):
    """Pairs of images in one batch of epoch e that meet again in one batch of epoch e + 1.

    A global shuffle gives (B-1)/(N-1). Here units of U rows are read in groups of G units (a pool
    of P = G*U rows) in random order, so a pair meets again when it shares a unit (a share
    (U-1)/(P-1) of the pairs) or its two units share a group again ((G-1)/(n-1)), and then lands in
    one batch of the group ((B-1)/(P-1)): expected [u + (1-u) g] (B-1)/(P-1). With U=8, G=8, n=64,
    B=16, N=512 that is 0.050 against 0.029 for a global shuffle; batches of whole read units (the
    old stream) would give > 0.47. The test holds the measured share to < 2x the global shuffle.
    """
    batch, images = 16, 512
    layout = plan_layout(mixing_collection, pool=64, seed=11)
    assert layout.units_per_group == 8
    dataset = build_view_dataset(mixing_collection, TINY_VIEWS, layout, end_epoch=4).dataset
    batches_by_epoch: dict[int, list[list[int]]] = {}
    for rows in dataset.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True):
        batches_by_epoch.setdefault(int(rows["epoch"].max()), []).append(rows["index"].tolist())
    met, repeated = 0, 0
    for epoch in range(3):
        together = {frozenset(pair) for members in batches_by_epoch[epoch + 1] for pair in combinations(members, 2)}
        for members in batches_by_epoch[epoch]:
            for pair in combinations(members, 2):
                met += 1
                repeated += frozenset(pair) in together
    share, global_share = repeated / met, (batch - 1) / (images - 1)
    assert share < 2 * global_share, (share, global_share)
    assert share > 0.5 * global_share  # the statistic sees repeats at all


def test_a_class_sorted_folder_gives_batches_with_the_dataset_class_mix(ray_cluster, tmp_path):
    write_image_folder(tmp_path, {"a": 64, "b": 64, "c": 64, "d": 64})  # read in sorted path order
    collection = plan_collection(str(tmp_path))
    dataset = build_view_dataset(collection, TINY_VIEWS, plan_layout(collection, seed=2), end_epoch=2).dataset
    distances = []
    for rows in dataset.iter_batches(batch_size=32, batch_format="numpy", drop_last=True):
        histogram = np.bincount(rows["label"], minlength=4) / len(rows["label"])
        distances.append(0.5 * np.abs(histogram - 0.25).sum())
    # A random sample of 32 from four equal classes is ~0.12 off in total variation on average;
    # batches read in path order would be 0.75 off (one class each).
    assert np.mean(distances) < 0.2, np.mean(distances)


def test_views_depend_only_on_seed_epoch_and_image(ray_cluster, parquet_collection):
    def views(layout):
        by_image = {}
        for worker in range(layout.workers):
            dataset = build_view_dataset(parquet_collection, SMALL_VIEWS, layout, worker=worker, end_epoch=2).dataset
            by_image.update({(int(r["epoch"]), int(r["index"])): (r["query"], r["key"]) for r in _rows(dataset)})
        return by_image

    first = views(plan_layout(parquet_collection, pool=16, seed=5))
    other_layout = views(plan_layout(parquet_collection, workers=2, lanes_per_worker=2, pool=64, seed=5))
    other_seed = views(plan_layout(parquet_collection, pool=16, seed=6))
    assert len(first) == len(other_layout) == 120
    assert all(np.array_equal(first[k][0], other_layout[k][0]) for k in first)
    assert all(np.array_equal(first[k][1], other_layout[k][1]) for k in first)
    query, key = first[(0, 7)]
    assert query.shape == (16, 16, 3) and query.dtype == np.uint8 and not np.array_equal(query, key)
    assert sum(np.array_equal(first[k][0], other_seed[k][0]) for k in first) == 0
    assert sum(np.array_equal(first[(0, i)][0], first[(1, i)][0]) for i in range(60)) == 0  # new views each epoch


# ----------------------------------------------------------------------------- resume


def _consume(stream, progress: StreamProgress, limit: int | None, batch_size: int = 8) -> list[tuple[int, int]]:
    """What training does: take batches through ViewStream.training_batches, then stop."""
    seen = []
    batches = stream.training_batches(batch_size, progress)
    for count, rows in enumerate(batches):
        seen.extend(zip(rows["epoch"].tolist(), rows["index"].tolist()))
        if limit is not None and count + 1 == limit:
            batches.close()
            break
    return seen


def _training_stream(collection, layout, **options):
    return build_view_dataset(collection, SMALL_VIEWS, layout, window_rows=lane_window(layout, 8), **options)


def test_each_lanes_rows_reach_training_in_the_order_they_left_the_lane(ray_cluster, parquet_collection):
    """What exact resume rests on: a batch never overtakes an earlier one of the same lane (Ray
    Data formatting several batches at once in threads hands them out as they finish)."""
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    stream = build_view_dataset(parquet_collection, TINY_VIEWS, layout, window_rows=lane_window(layout, 2), end_epoch=2)
    by_lane: dict[int, list[int]] = {0: [], 1: []}
    for batch in stream.training_batches(2, StreamProgress(layout.total_lanes)):
        for lane, position in zip(batch["lane"].tolist(), batch["position"].tolist()):
            by_lane[lane].append(position)
    assert sum(map(len, by_lane.values())) == 120
    assert all(positions == sorted(positions) for positions in by_lane.values())


def test_training_batches_stay_on_the_host_inside_a_ray_train_worker(ray_cluster, parquet_collection, monkeypatch):
    """Inside a Ray Train worker Ray Data moves batches to the worker's device unless told not to;
    the stream reads positions on the host. The worker's device is faked as ``meta`` here (no GPU),
    so a batch moved there could not be read at all."""
    import ray.train.torch
    import ray.train.utils
    import torch

    monkeypatch.setattr(ray.train.utils, "_in_ray_train_worker", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    progress = StreamProgress(layout.total_lanes)
    seen = _consume(_training_stream(parquet_collection, layout, end_epoch=1), progress, limit=None)
    assert sorted(index for _, index in seen) == list(range(60))
    assert progress.positions.sum() > 0


def test_a_resumed_stream_continues_exactly_where_training_stopped(ray_cluster, parquet_collection):
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    progress = StreamProgress(layout.total_lanes)
    before = _consume(_training_stream(parquet_collection, layout, end_epoch=2), progress, limit=7)
    resumed = _training_stream(parquet_collection, layout, positions=progress.positions, end_epoch=2)
    after = _consume(resumed, progress, limit=None)
    assert len(before) == 56 and len(before) + len(after) == 120
    for epoch in (0, 1):  # nothing seen twice, nothing skipped
        assert sorted(index for e, index in before + after if e == epoch) == list(range(60))
    assert ray.get(resumed.ingest_state.snapshot.remote())["delivered"] == len(after)


def test_a_resume_with_another_layout_skips_nothing(ray_cluster, parquet_collection):
    saved = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    progress = StreamProgress(saved.total_lanes)
    before = _consume(_training_stream(parquet_collection, saved, end_epoch=2), progress, limit=5)
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=1, pool=32, seed=4)
    positions = restart_positions(layout, saved, progress.positions)
    resumed = _training_stream(parquet_collection, layout, positions=positions, end_epoch=2)
    after = _consume(resumed, StreamProgress(layout.total_lanes), limit=None)
    for epoch in (0, 1):
        assert set(range(60)) <= {index for e, index in before + after if e == epoch}
    repeats = len(before) + len(after) - 120
    assert 0 <= repeats <= len(before)  # only images trained on before the restart come again


def test_blocks_are_large_but_several_fit_in_a_lane_window():
    """Ray Data's cost is per block: a 224 px lane yields blocks of a quarter of its window (not the
    4 rows a 1 MB cap allowed), never more than MAX_BLOCK_ROWS rows or BLOCK_BYTES bytes."""
    from pipelines.ingest import stream

    views_224 = TwoViewFunction(AugmentConfig(recipe="v2", size=224))
    assert rows_per_block(views_224, window_rows=400) == 100
    assert rows_per_block(views_224) == min(stream.MAX_BLOCK_ROWS, stream.BLOCK_BYTES // views_224.bytes_per_row)
    assert rows_per_block(TINY_VIEWS, window_rows=2) == 1
    assert rows_per_block(views_224, object_store_bytes=120 << 20) == (120 << 20) // 64 // views_224.bytes_per_row
    assert rows_per_block(TINY_VIEWS) == stream.MAX_BLOCK_ROWS


def test_lanes_run_at_most_a_window_ahead_of_training(ray_cluster, parquet_collection):
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    window = lane_window(layout, 8)
    stream = _training_stream(parquet_collection, layout)  # endless: 60 images an epoch, forever
    batches = stream.training_batches(8, StreamProgress(layout.total_lanes))
    for _ in range(3):
        next(batches)
    time.sleep(3)  # ample time to decode dozens of epochs without the window
    delivered = ray.get(stream.ingest_state.snapshot.remote())["delivered"]
    batches.close()
    # Counted per group (~14 rows), so a lane can show one group beyond its window.
    assert 3 * 8 <= delivered <= 3 * 8 + 2 * (window + 16), (delivered, window)


def test_a_lane_a_window_ahead_is_released_by_the_consumers_report_not_by_polling(ray_cluster):
    """The lane's wait is one call that returns when the consumer reports (lanes used to ask the
    actor every 20 ms: ~8% of a core on 2 cores, and a flood of calls from a cluster's lanes)."""
    state = IngestState.remote()
    waiting = state.wait_consumed.remote("stream", 3, 10, 60.0)
    state.report_consumed.remote("stream", {2: 50})  # another lane's progress does not release it
    state.report_consumed.remote("other", {3: 50})  # nor another stream's
    assert ray.wait([waiting], timeout=1.0)[0] == []
    started = time.monotonic()
    state.report_consumed.remote("stream", {3: 11})
    assert ray.get(waiting, timeout=10) == 11
    assert time.monotonic() - started < 5  # released by the report, long before the 60 s bound
    assert ray.get(state.wait_consumed.remote("stream", 3, 20, 0.2), timeout=10) == 11  # bounded wait


def test_a_slow_consumer_leaves_the_executor_idle(ray_cluster, parquet_collection, monkeypatch):
    """While training works on a batch, the lanes wait within their window: Ray Data must not
    hold finished blocks back from the consumer, or its executor spins on them, a CPU lost to
    training (796e481 made the job 2.4x slower that way). Counts the executor's decisions to
    hold a task's outputs back (Ray Data's hook for them) over four slow steps."""
    from ray.data._internal.execution.interfaces.physical_operator import PhysicalOperator

    held_back = []
    original = PhysicalOperator.notify_in_task_output_backpressure

    def count(self, in_backpressure, *args, **kwargs):
        if in_backpressure:
            held_back.append(self.name)
        return original(self, in_backpressure, *args, **kwargs)

    monkeypatch.setattr(PhysicalOperator, "notify_in_task_output_backpressure", count)
    layout = plan_layout(parquet_collection, workers=1, lanes_per_worker=2, pool=16, seed=4)
    batches = _training_stream(parquet_collection, layout).training_batches(8, StreamProgress(layout.total_lanes))
    for _ in range(4):
        next(batches)
        time.sleep(0.5)  # a training step
    batches.close()
    assert len(held_back) < 50, f"the executor held the lanes' outputs back {len(held_back)} times in 2 s"


# ----------------------------------------------------------------------------- bad data, eval, memory


def test_corrupt_images_are_skipped_and_counted_with_the_reason(ray_cluster, tmp_path):
    write_image_folder(tmp_path, {"a": 6, "b": 6})
    whole = jpeg_bytes(99, size=(64, 64))
    (tmp_path / "a" / "truncated.jpg").write_bytes(whole[: len(whole) * 3 // 4])
    (tmp_path / "a" / "text.jpg").write_bytes(b"this is not a picture")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "dot.png").write_bytes(jpeg_bytes(1, size=(1, 1), fmt="PNG"))
    (tmp_path / "b" / "cmyk.jpg").write_bytes(jpeg_bytes(2, mode="CMYK"))
    (tmp_path / "b" / "rgba.png").write_bytes(jpeg_bytes(3, mode="RGBA", fmt="PNG"))
    collection = plan_collection(str(tmp_path))
    stream = build_view_dataset(collection, SMALL_VIEWS, plan_layout(collection), end_epoch=1)
    assert len(_rows(stream.dataset)) == 14
    counts = ray.get(stream.ingest_state.snapshot.remote())
    assert counts["delivered"] == 14 and counts["skipped"] == 4
    assert counts["skipped_by_reason"] == {"truncated": 1, "not_an_image": 1, "empty": 1, "too_small": 1}
    assert counts["converted_by_mode"] == {"CMYK": 1, "RGBA": 1}


def test_eval_views_are_the_centre_crops_of_every_image(ray_cluster, parquet_collection):
    layout = plan_layout(parquet_collection, lanes_per_worker=2, shuffle=False)
    rows = _rows(build_view_dataset(parquet_collection, EvalViewFunction(16), layout, end_epoch=1).dataset)
    assert sorted(int(row["index"]) for row in rows) == list(range(60))
    crop = CenterCropTransform(16)
    for row in rows[:10]:
        assert np.array_equal(row["image"], crop(jpeg_bytes(int(row["index"])))[0])


def test_memory_stays_bounded_on_more_data_than_the_object_store_holds(ray_cluster, tmp_path):
    from tests.conftest import OBJECT_STORE_BYTES

    for shard in range(4):
        write_img2dataset_parquet(tmp_path / f"{shard}.parquet", 250, rows_per_group=50, start_seed=250 * shard)
    assert not _spilled_files()
    views = TwoViewFunction(AugmentConfig(recipe="v1", size=128))
    collection = plan_collection(str(tmp_path))
    layout = plan_layout(collection, lanes_per_worker=2)
    stream = build_view_dataset(collection, views, layout, end_epoch=5)
    produced = 0
    for batch in stream.dataset.iter_batches(batch_size=64, batch_format="numpy"):
        produced += batch["query"].nbytes + batch["key"].nbytes
    assert ray.get(stream.ingest_state.snapshot.remote())["delivered"] == 5000
    assert produced == 5000 * 2 * 128 * 128 * 3 > 3 * OBJECT_STORE_BYTES  # streamed, never all resident
    assert not _spilled_files(), "objects were spilled to disk: the stream did not stay in memory bounds"


def _spilled_files() -> list:
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return [
        path for directory in session.glob("ray_spilled_objects*") for path in directory.rglob("*") if path.is_file()
    ]
