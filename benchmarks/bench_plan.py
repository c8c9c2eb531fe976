"""``moco bench plan``: planning and stream start-up on collections of 1M to 100M images.

Synthetic ``moco shard`` collections (real Parquet files in our schema and a real manifest: 2048
images per shard in row groups of 256; every image is the same tiny JPEG, dictionary-encoded so
100M images fit in ~2 GB of disk) isolate the machinery from decoding. For each size, in a fresh
process (so its peak memory is its own):

* ``plan_s`` and ``plan_peak_rss_mb``: :func:`plan_collection` from the manifest;
* ``first_batch_s``: from the start of planning to the first training batch out of the stream
  (:func:`build_view_dataset` -> ``ViewStream.training_batches``), Ray already running;
* ``footers_plan_s``: the same files planned as foreign Parquet (every footer read, on Ray tasks),
  what the planner did for every collection before the manifest was used: the baseline.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.common import machine_info, measure_in_fresh_process
from benchmarks.corpus import default_work_dir
from pipelines.console import Progress, note
from pipelines.ingest.schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_SCHEMA

IMAGES_PER_SHARD = 2048
ROW_GROUP_SIZE = 256


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def synthetic_collection(root: Path, num_images: int) -> Path:
    """``root/<n>-images/``: shards and manifest of ``num_images`` tiny images (built once)."""
    directory = root / f"plan-{num_images}"
    if (directory / MANIFEST_NAME).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    image = _tiny_jpeg()
    num_shards = -(-num_images // IMAGES_PER_SHARD)
    width = max(5, len(str(num_shards - 1)))
    shards = []
    progress = Progress(f"bench plan: writing {num_images} images", total=num_shards, unit="shard")
    for index in range(num_shards):
        count = min(IMAGES_PER_SHARD, num_images - index * IMAGES_PER_SHARD)
        first = index * IMAGES_PER_SHARD
        table = pa.table(
            {
                "key": pa.array([f"img{first + row:010d}" for row in range(count)], pa.string()),
                "image": pa.array([image] * count, pa.binary()),
                "label": pa.array(np.arange(first, first + count) % 1000, pa.int64()),
                "width": pa.array(np.full(count, 8, np.int32)),
                "height": pa.array(np.full(count, 8, np.int32)),
            },
            schema=SHARD_SCHEMA,
        )
        name = f"shard-{index:0{width}d}.parquet"
        pq.write_table(table, directory / name, row_group_size=ROW_GROUP_SIZE, use_dictionary=["image"])
        shards.append({"path": name, "num_images": count, "num_row_groups": -(-count // ROW_GROUP_SIZE)})
        progress.update(index + 1)
    progress.finish(num_shards)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_images": num_images,
        "num_shards": num_shards,
        "shards": shards,
        "class_names": [],
        "skipped": [],
        "sources": ["synthetic"],
        "max_side": None,
        "options": {
            "schema_version": SCHEMA_VERSION,
            "images_per_shard": IMAGES_PER_SHARD,
            "row_group_size": ROW_GROUP_SIZE,
        },
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def _memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(path: str, layout: str) -> dict:
    """In this process: plan ``path`` (as ``layout``), then stream until the first batch."""
    import ray

    from moco_core.augment import AugmentConfig
    from pipelines.ingest.planning import plan_collection
    from pipelines.ingest.stream import StreamProgress, build_view_dataset, lane_window, plan_layout
    from pipelines.ingest.views import TwoViewFunction
    from pipelines.ray_runtime import quiet_ray_data

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    quiet_ray_data()
    resident_before, _ = _memory_mb()
    start = time.perf_counter()
    collection = plan_collection(path, layout)  # type: ignore[arg-type]
    planned = time.perf_counter()
    resident_after, peak = _memory_mb()
    result = {
        "images": collection.num_images,
        "read_units": len(collection.units),
        "unit_table_mb": round(collection.units.nbytes / 2**20, 2),
        "plan_s": round(planned - start, 3),
        "process_rss_before_plan_mb": round(resident_before, 1),
        "plan_rss_growth_mb": round(resident_after - resident_before, 1),
        "plan_peak_rss_mb": round(peak, 1),
    }
    if layout == "moco":
        stream_layout = plan_layout(collection, lanes_per_worker=1)
        views = TwoViewFunction(AugmentConfig(recipe="v2", size=32))
        stream = build_view_dataset(
            collection, views, stream_layout, lane_cpus=1, window_rows=lane_window(stream_layout, 256)
        )
        batches = stream.training_batches(256, StreamProgress(stream_layout.total_lanes))
        next(batches)
        result["first_batch_s"] = round(time.perf_counter() - start, 2)
        result["stream_start_s"] = round(time.perf_counter() - planned, 2)
        result["peak_rss_mb"] = round(_memory_mb()[1], 1)
        batches.close()
    ray.shutdown()
    return result


def run_plan_benchmark(
    work_dir: str | None = None, sizes: tuple[int, ...] = (1_000_000, 10_000_000, 100_000_000), footers: bool = True
) -> dict:
    """Build (once) and measure each collection size; ``growth`` compares the largest to the smallest."""
    work = Path(work_dir) if work_dir else default_work_dir()
    by_size = {}
    for size in sizes:
        path = synthetic_collection(work, size)
        note(f"bench plan: measuring {size} images")
        result = measure_in_fresh_process(
            "benchmarks.bench_plan:measure", f"bench plan {size}", path=str(path), layout="moco"
        )
        if footers:
            baseline = measure_in_fresh_process(
                "benchmarks.bench_plan:measure", f"bench plan {size}", path=str(path), layout="parquet"
            )
            result["footers_plan_s"] = baseline["plan_s"]
            result["footers_plan_rss_growth_mb"] = baseline["plan_rss_growth_mb"]
        by_size[str(size)] = result
    smallest, largest = by_size[str(sizes[0])], by_size[str(sizes[-1])]
    scale = sizes[-1] / sizes[0]
    return {
        "benchmark": "plan",
        "config": {"images_per_shard": IMAGES_PER_SHARD, "row_group_size": ROW_GROUP_SIZE, "view_size": 32},
        "machine": machine_info(torch.device("cpu")),
        "by_size": by_size,
        "growth": {
            "images": scale,
            "plan_s": round(largest["plan_s"] / max(smallest["plan_s"], 1e-3), 1),
            "plan_rss_growth_mb": round(largest["plan_rss_growth_mb"] - smallest["plan_rss_growth_mb"], 1),
            "first_batch_s": round(largest["first_batch_s"] / smallest["first_batch_s"], 2),
        },
        "ratio": round(largest.get("footers_plan_s", largest["plan_s"]) / max(largest["plan_s"], 1e-3), 1),
    }
