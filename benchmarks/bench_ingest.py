"""``moco bench ingest``: normalised views/s delivered to a training loop, ours against the official loader.

On an ImageNet-like JPEG corpus (see ``benchmarks/corpus.py``), in one run, like for like: the
same MoCo v2 augmentation (PIL's Gaussian blur on both sides), the same output (normalised float32
views ready for the model), the same number of worker processes, the same statistic (images/s
after the first batch, over every batch of ``epochs`` epochs):

* (a) the official MoCo loader: torchvision ``ImageFolder`` + ``DataLoader`` (``workers``
  processes, shuffled) + ``TwoCropsTransform``;
* (b) our per-image decode + two-view function alone, in one process on one core;
* (c) our stream as ``moco pretrain`` runs it: Parquet shards from ``moco shard`` -> ``workers``
  reader lanes -> ``ViewStream.training_batches`` -> ``prepare_model_input`` (normalisation)
  in the consuming process, with ``augment.blur=pil``.

``ratio`` = (c) / (a); ``efficiency`` = (c) / ((b) x workers). Reported beside them, not instead
of them: (c) with our default discrete Gaussian blur (``variants.gaussian_blur``), and with the
photometric part batched on the training device (``variants.photometric_device``, which on this
CPU-only machine runs in the consuming process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from benchmarks.corpus import corpus_with_shards
from benchmarks.official import official_two_crops
from moco_core.augment import AugmentConfig
from moco_core.photometric import prepare_model_input
from pipelines.console import Progress
from pipelines.ray_runtime import quiet_ray_data


def _timed_consumption(batches: Iterable, count_images, label: str, total: int | None) -> float:
    """Images/s after the first batch (start-up excluded), consuming every batch."""
    progress = Progress(label, total=total, unit="img")
    iterator = iter(batches)
    count_images(next(iterator))
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += count_images(batch)
        progress.update(seen)
    elapsed = time.perf_counter() - start
    progress.finish(seen)
    return seen / elapsed


def official_loader_throughput(corpus: str, size: int, workers: int, batch_size: int, epochs: int) -> float:
    """(a): the official main_moco.py data path, measured in images/s."""
    import torchvision.datasets as datasets

    dataset = datasets.ImageFolder(corpus, official_two_crops(size))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False, persistent_workers=True
    )

    def every_epoch():
        for _ in range(epochs):
            yield from loader

    return _timed_consumption(
        every_epoch(),
        lambda batch: batch[0][0].shape[0],
        f"bench ingest: official {size}px",
        total=len(dataset) * epochs,
    )


def single_process_throughput(images: list[bytes], config: AugmentConfig) -> float:
    """(b): our per-image decode + two views, one process, one core."""
    from pipelines.ingest.views import TwoViewFunction

    views = TwoViewFunction(config)
    rng = np.random.default_rng(0)
    views(images[0], rng)
    start = time.perf_counter()
    for data in images:
        views(data, rng)
    return len(images) / (time.perf_counter() - start)


def ray_pipeline_throughput(shards: str, config: AugmentConfig, readers: int, batch_size: int, epochs: int) -> dict:
    """(c): the pretraining stream, consumed as a training worker consumes it, up to model input."""
    from pipelines.ingest.planning import plan_collection
    from pipelines.ingest.stream import StreamProgress, build_view_dataset, lane_window, plan_layout
    from pipelines.ingest.views import TwoViewFunction

    collection = plan_collection(shards)
    layout = plan_layout(collection, lanes_per_worker=readers)
    stream = build_view_dataset(
        collection,
        TwoViewFunction(config),
        layout,
        end_epoch=epochs,
        window_rows=lane_window(layout, batch_size),
    )
    generator = torch.Generator().manual_seed(0)

    def model_input(batch: dict) -> int:
        prepare_model_input(batch["query"], config, generator)
        prepare_model_input(batch["key"], config, generator)
        return batch["query"].shape[0]

    throughput = _timed_consumption(
        stream.training_batches(batch_size, StreamProgress(layout.total_lanes)),
        model_input,
        f"bench ingest: ours {config.size}px blur={config.blur} photometric={config.photometric}",
        total=(collection.num_images or 0) * epochs,
    )
    import ray

    return {"img_per_s": throughput, "counters": ray.get(stream.ingest_state.snapshot.remote())}


def consumer_cost_ms_per_image(config: AugmentConfig, batch_size: int, repeats: int = 3) -> float:
    """Milliseconds per image (both views) that the training loop spends turning uint8 views into
    model input on this machine's CPU (here: the whole photometric part)."""
    views = torch.randint(0, 256, (batch_size, config.size, config.size, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    prepare_model_input(views, config, generator)
    start = time.perf_counter()
    for _ in range(repeats):
        prepare_model_input(views, config, generator)
        prepare_model_input(views, config, generator)
    return 1000.0 * (time.perf_counter() - start) / (repeats * batch_size)


def _load_image_bytes(corpus: str, limit: int) -> list[bytes]:
    paths = sorted(Path(corpus).glob("*/*.jpg"))[:limit]
    return [path.read_bytes() for path in paths]


def run_ingest_benchmark(
    work_dir: str | None = None,
    num_images: int = 2000,
    sizes: tuple[int, ...] = (224, 64),
    workers: int = 2,
    batch_size: int = 256,
    epochs: int = 2,
    single_process_images: int = 300,
) -> dict:
    """Build (or reuse) the corpus and its shards, then measure (a), (b) and (c) at each size."""
    import ray

    corpus, shards_dir = corpus_with_shards(work_dir, num_images)
    raw_images = _load_image_bytes(corpus["path"], single_process_images)

    results: dict = {
        "benchmark": "ingest",
        "config": {
            "num_images": num_images,
            "workers": workers,
            "batch_size": batch_size,
            "epochs": epochs,
            "recipe": "v2",
            "corpus_mean_kb": corpus["mean_kb"],
            "shards": shards_dir,
        },
        "machine": machine_info(torch.device("cpu")),
        "by_size": {},
    }
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    quiet_ray_data()
    try:
        for size in sizes:
            like_for_like = AugmentConfig(recipe="v2", size=size, photometric="cpu", blur="pil")
            official = official_loader_throughput(corpus["path"], size, workers, batch_size, epochs)
            single = single_process_throughput(raw_images, like_for_like)
            ours = ray_pipeline_throughput(shards_dir, like_for_like, workers, batch_size, epochs)
            gaussian = replace(like_for_like, blur="gaussian")
            ours_gaussian = ray_pipeline_throughput(shards_dir, gaussian, workers, batch_size, epochs)
            on_device = replace(gaussian, photometric="device")
            ours_device = ray_pipeline_throughput(shards_dir, on_device, workers, batch_size, epochs)
            results["by_size"][str(size)] = {
                "official_img_per_s": round(official, 1),
                "ours_img_per_s": round(ours["img_per_s"], 1),
                "ratio": round(ours["img_per_s"] / official, 3),
                "single_process_img_per_s": round(single, 1),
                "efficiency": round(ours["img_per_s"] / (single * workers), 3),
                "variants": {
                    "gaussian_blur": {
                        "ours_img_per_s": round(ours_gaussian["img_per_s"], 1),
                        "single_process_img_per_s": round(single_process_throughput(raw_images, gaussian), 1),
                    },
                    "photometric_device": {
                        "ours_img_per_s": round(ours_device["img_per_s"], 1),
                        "single_process_img_per_s": round(single_process_throughput(raw_images, on_device), 1),
                        "consumer_ms_per_img": round(consumer_cost_ms_per_image(on_device, batch_size), 3),
                    },
                },
                "skipped": ours["counters"]["skipped"],
            }
    finally:
        ray.shutdown()
    headline = results["by_size"][str(sizes[0])]
    results["ratio"] = headline["ratio"]
    results["efficiency"] = headline["efficiency"]
    return results
