"""``moco bench ingest``: images/s delivered to a training loop, ours against the official loader.

On an ImageNet-like JPEG corpus (see ``benchmarks/corpus.py``), in one run:

* (a) the official MoCo loader: torchvision ``ImageFolder`` + ``DataLoader`` (``workers``
  processes) + ``TwoCropsTransform`` with the v2 augmentation, yielding normalised float views;
* (b) our per-image decode + two-view function alone, in one process on one core (also with
  the official code's PIL blur, ``blur="pil"``, to show what that parity costs);
* (c) our Ray Data pipeline end to end (Parquet shards from ``moco shard`` -> reader tasks ->
  ``iter_torch_batches``), with ``workers`` reader tasks, delivering uint8 views.

``ratio`` = (c) / (a); ``efficiency`` = (c) / ((b) x workers). The photometric placement is
measured both ways: per image in the CPU readers (``cpu``), or only geometry in the readers
with colour jitter / grayscale / blur batched on the training device (``device``; its cost on
this machine's CPU is reported per image, as ``consumer_ms_per_img``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from benchmarks.corpus import corpus_with_shards
from moco_core.augment import AugmentConfig
from moco_core.photometric import prepare_model_input
from pipelines.console import Progress
from pipelines.ingest.dataset import quiet_ray_data


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


class _OfficialGaussianBlur:
    """The official MoCo v2 blur: PIL GaussianBlur with sigma drawn from [0.1, 2.0]."""

    def __call__(self, image):
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _TwoCrops:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def official_loader_throughput(corpus: str, size: int, workers: int, batch_size: int, epochs: int) -> float:
    """(a): the official main_moco.py data path, measured in images/s."""
    import torchvision.datasets as datasets
    import torchvision.transforms as transforms

    augmentation = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([_OfficialGaussianBlur()], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(corpus, _TwoCrops(augmentation))
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


def ray_pipeline_throughput(shards: str, config: AugmentConfig, workers: int, batch_size: int, epochs: int) -> dict:
    """(c): plan the shards, stream two views through Ray Data into ``iter_torch_batches``."""
    from pipelines.ingest.dataset import build_view_dataset
    from pipelines.ingest.sources import plan_collection
    from pipelines.ingest.views import TwoViewFunction

    collection = plan_collection(shards)
    dataset, counters = build_view_dataset(
        collection, TwoViewFunction(config), end_epoch=epochs, seed=0, readers=workers
    )
    throughput = _timed_consumption(
        dataset.iter_torch_batches(batch_size=batch_size, prefetch_batches=2),
        lambda batch: batch["query"].shape[0],
        f"bench ingest: ray {config.size}px photometric={config.photometric}",
        total=(collection.num_images or 0) * epochs,
    )
    import ray

    return {"img_per_s": throughput, "counters": ray.get(counters.snapshot.remote())}


def consumer_cost_ms_per_image(config: AugmentConfig, batch_size: int, repeats: int = 3) -> float:
    """Milliseconds per image (both views) that the training loop spends turning uint8 views into
    model input on this machine's CPU: normalisation only, or the whole photometric part."""
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
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    quiet_ray_data()
    try:
        for size in sizes:
            cpu_config = AugmentConfig(recipe="v2", size=size, photometric="cpu")
            device_config = AugmentConfig(recipe="v2", size=size, photometric="device")
            official = official_loader_throughput(corpus["path"], size, workers, batch_size, epochs)
            single = single_process_throughput(raw_images, cpu_config)
            single_pil_blur = single_process_throughput(raw_images, replace(cpu_config, blur="pil"))
            single_device = single_process_throughput(raw_images, device_config)
            ray_cpu = ray_pipeline_throughput(shards_dir, cpu_config, workers, batch_size, epochs)
            ray_device = ray_pipeline_throughput(shards_dir, device_config, workers, batch_size, epochs)
            results["by_size"][str(size)] = {
                "official_img_per_s": round(official, 1),
                "single_process_img_per_s": round(single, 1),
                "single_process_pil_blur_img_per_s": round(single_pil_blur, 1),
                "ray_img_per_s": round(ray_cpu["img_per_s"], 1),
                "ratio": round(ray_cpu["img_per_s"] / official, 3),
                "efficiency": round(ray_cpu["img_per_s"] / (single * workers), 3),
                "photometric_device": {
                    "single_process_img_per_s": round(single_device, 1),
                    "ray_img_per_s": round(ray_device["img_per_s"], 1),
                    "consumer_ms_per_img": round(consumer_cost_ms_per_image(device_config, batch_size), 3),
                },
                "photometric_cpu_consumer_ms_per_img": round(consumer_cost_ms_per_image(cpu_config, batch_size), 3),
                "skipped": ray_cpu["counters"]["skipped"],
            }
    finally:
        ray.shutdown()
    headline = results["by_size"][str(sizes[0])]
    results["ratio"] = headline["ratio"]
    results["efficiency"] = headline["efficiency"]
    return results
