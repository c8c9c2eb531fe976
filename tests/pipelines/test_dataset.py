"""The Ray Data two-view stream: exactly-once delivery, seeded views, bad data counted, bounded memory."""

from pathlib import Path

import numpy as np
import pytest
import ray

from moco_core.augment import AugmentConfig
from pipelines.ingest.dataset import StreamPosition, build_view_dataset, plan_stream
from pipelines.ingest.sources import plan_collection
from pipelines.ingest.views import EvalViewFunction, TwoViewFunction
from tests.pipelines.fixtures import jpeg_bytes, write_image_folder, write_img2dataset_parquet

SMALL_VIEWS = TwoViewFunction(AugmentConfig(recipe="v2", size=16))


@pytest.fixture(scope="module")
def parquet_collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    for shard in range(3):
        write_img2dataset_parquet(root / f"{shard:05d}.parquet", 20, rows_per_group=8, start_seed=20 * shard)
    return plan_collection(str(root))  # 60 images in 9 row groups


def _rows(dataset) -> list[dict]:
    rows = []
    for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"):
        rows.extend({name: batch[name][i] for name in batch} for i in range(len(batch["index"])))
    return rows


def test_plan_covers_every_unit_once_per_epoch_from_the_start_position():
    plan = plan_stream(5, end_epoch=3, seed=1, shuffle=True, start=StreamPosition(epoch=1, unit_position=2))
    assert plan[:, 0].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert plan[:3, 1].tolist() == [2, 3, 4]
    assert sorted(plan[3:, 2].tolist()) == [0, 1, 2, 3, 4]
    again = plan_stream(5, end_epoch=3, seed=1, shuffle=True)
    assert not np.array_equal(again[:5, 2], again[5:10, 2])  # a new order each epoch
    assert np.array_equal(again[5:], plan_stream(5, 3, 1, True, StreamPosition(1, 0)))


def test_two_workers_get_every_image_exactly_once_per_epoch(ray_cluster, parquet_collection):
    dataset, _ = build_view_dataset(parquet_collection, SMALL_VIEWS, end_epoch=2, seed=3, readers=2)

    @ray.remote(num_cpus=0)
    def consume(iterator):
        return [
            (int(e), int(i))
            for batch in iterator.iter_batches(batch_size=8, batch_format="numpy")
            for e, i in zip(batch["epoch"], batch["index"])
        ]

    first, second = ray.get([consume.remote(split) for split in dataset.streaming_split(2, equal=True)])
    assert first and second and not set(first) & set(second)
    for epoch in (0, 1):
        delivered = sorted(i for e, i in first + second if e == epoch)
        assert delivered == list(range(60))


def test_views_are_uint8_differ_and_are_reproducible_under_a_seed(ray_cluster, parquet_collection):
    def views_by_image(seed):
        dataset, _ = build_view_dataset(parquet_collection, SMALL_VIEWS, end_epoch=2, seed=seed, readers=2)
        return {(int(row["epoch"]), int(row["index"])): (row["query"], row["key"]) for row in _rows(dataset)}

    first, again, other = views_by_image(5), views_by_image(5), views_by_image(6)
    query, key = first[(0, 7)]
    assert query.shape == (16, 16, 3) and query.dtype == np.uint8
    assert not np.array_equal(query, key)  # two independent views
    assert all(np.array_equal(first[k][0], again[k][0]) and np.array_equal(first[k][1], again[k][1]) for k in first)
    assert not np.array_equal(first[(0, 7)][0], other[(0, 7)][0])
    assert not np.array_equal(first[(0, 7)][0], first[(1, 7)][0])  # new augmentation each epoch


def test_iter_torch_batches_shapes_and_dtypes(ray_cluster, parquet_collection):
    import torch

    dataset, _ = build_view_dataset(parquet_collection, SMALL_VIEWS, end_epoch=1, seed=0, readers=1)
    batch = next(iter(dataset.iter_torch_batches(batch_size=10, drop_last=True)))
    assert batch["query"].shape == (10, 16, 16, 3) and batch["query"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64


def test_corrupt_images_are_skipped_and_counted_with_the_reason(ray_cluster, tmp_path):
    write_image_folder(tmp_path, {"a": 6, "b": 6})
    whole = jpeg_bytes(99, size=(64, 64))
    (tmp_path / "a" / "truncated.jpg").write_bytes(whole[: len(whole) * 3 // 4])
    (tmp_path / "a" / "text.jpg").write_bytes(b"this is not a picture")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "dot.png").write_bytes(jpeg_bytes(1, size=(1, 1), fmt="PNG"))
    (tmp_path / "b" / "cmyk.jpg").write_bytes(jpeg_bytes(2, mode="CMYK"))
    (tmp_path / "b" / "rgba.png").write_bytes(jpeg_bytes(3, mode="RGBA", fmt="PNG"))
    dataset, counters = build_view_dataset(plan_collection(str(tmp_path)), SMALL_VIEWS, end_epoch=1, readers=2)
    assert len(_rows(dataset)) == 14
    counts = ray.get(counters.snapshot.remote())
    assert counts["delivered"] == 14 and counts["skipped"] == 4
    assert counts["skipped_by_reason"] == {"truncated": 1, "not_an_image": 1, "empty": 1, "too_small": 1}
    assert counts["converted_by_mode"] == {"CMYK": 1, "RGBA": 1}


def test_eval_views_are_deterministic_centre_crops(ray_cluster, parquet_collection):
    dataset, _ = build_view_dataset(parquet_collection, EvalViewFunction(16), end_epoch=1, shuffle=False, readers=1)
    rows = _rows(dataset)
    assert len(rows) == 60 and rows[0]["image"].shape == (16, 16, 3)
    again = {int(row["index"]): row["image"] for row in _rows(dataset)}
    assert all(np.array_equal(row["image"], again[int(row["index"])]) for row in rows)


def test_memory_stays_bounded_on_more_data_than_the_object_store_holds(ray_cluster, tmp_path):
    from tests.conftest import OBJECT_STORE_BYTES

    for shard in range(4):
        write_img2dataset_parquet(tmp_path / f"{shard}.parquet", 250, rows_per_group=50, start_seed=250 * shard)
    assert not _spilled_files()
    views = TwoViewFunction(AugmentConfig(recipe="v1", size=128))
    dataset, counters = build_view_dataset(plan_collection(str(tmp_path)), views, end_epoch=5, readers=2)
    produced = 0
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        produced += batch["query"].nbytes + batch["key"].nbytes
    assert ray.get(counters.snapshot.remote())["delivered"] == 5000
    assert produced > 3 * OBJECT_STORE_BYTES  # streamed, never all resident at once
    assert not _spilled_files(), "objects were spilled to disk: the stream did not stay in memory bounds"


def _spilled_files() -> list:
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return [
        path for directory in session.glob("ray_spilled_objects*") for path in directory.rglob("*") if path.is_file()
    ]


def test_a_restarted_stream_passes_over_units_before_the_resume_position(ray_cluster, parquet_collection):
    dataset, ingest_state = build_view_dataset(parquet_collection, SMALL_VIEWS, end_epoch=2, seed=2, shuffle=False)
    units = len(parquet_collection.units)  # 9 units per epoch: 8, 8, 4 rows per shard
    ray.get(ingest_state.set_resume_position.remote(units + 3))  # epoch 1, fourth unit
    rows = _rows(dataset)
    assert {int(row["epoch"]) for row in rows} == {1}
    assert min(int(row["unit_position"]) for row in rows) == 3
    assert ray.get(ingest_state.snapshot.remote())["delivered"] == len(rows) == 60 - (8 + 8 + 4)
