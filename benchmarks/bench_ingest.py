"""``moco bench ingest``: normalised views/s delivered to a training loop, ours against the official loader.

On an ImageNet-like JPEG corpus (see ``benchmarks/corpus.py``), in one run, like for like: the
same MoCo v2 augmentation (PIL's Gaussian blur on both sides), the same output (normalised float32
views ready for the model), the same number of worker processes, the same statistic (images/s
in the steady state: from batch ``STEADY_SKIP_BATCHES`` of ``epochs`` epochs to the last, see
:func:`_timed_consumption`):

* (a) the official MoCo loader: torchvision ``ImageFolder`` + ``DataLoader`` (``workers``
  processes, shuffled) + ``TwoCropsTransform``;
* (b) our per-image decode + two-view function alone, in one process on one core;
* (c) our stream as ``moco pretrain`` runs it: Parquet shards from ``moco shard`` -> ``workers``
  reader lanes -> ``ViewStream.training_batches`` -> ``prepare_model_input`` (normalisation,
  into reused buffers as the training worker does) in the consuming process, with ``augment.blur=pil``.

Every measurement runs in a fresh process (as a user's training script does), in ``repeats``
interleaved rounds whose medians are reported.

``ratio`` = (c) / (a); ``efficiency`` = (c) / ((b) x workers). Reported beside them, not instead
of them: the ratio over two other windows (every batch after the first; the whole time from
creating the iterator, start-up included), (c) with our default discrete Gaussian blur
(``variants.gaussian_blur``), and with the photometric part batched on the training device
(``variants.photometric_device``, which on this CPU-only machine runs in the consuming process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import local_ray, machine_info, measure_in_fresh_process, median_milliseconds, median_of
from benchmarks.corpus import corpus_with_shards
from benchmarks.official import official_two_crops
from moco_core.augment import AugmentConfig
from moco_core.photometric import InputBuffers, prepare_model_input
from pipelines.console import Progress

#: batches left out at the start of the steady-state window: more than either side can hold
#: ready before its first batch is taken (our lanes' window, 7 batches, plus the iterator's
#: prefetch of 1; the DataLoader's workers x prefetch_factor, 4)
STEADY_SKIP_BATCHES = 10


def _timed_consumption(
    batches: Iterable, count_images, label: str, total: int | None, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Consume every batch; images/s over three windows, the same on every path:

    * ``img_per_s``: the steady state, from batch ``STEADY_SKIP_BATCHES`` to the last: no
      start-up, and none of what a loader prepared ahead while its first batch was on its way;
    * ``after_first_img_per_s``: every batch after the first (buffered batches count as fast);
    * ``from_start_img_per_s``: every image over the whole time from creating the iterator
      (worker and lane start-up included).
    """
    progress = Progress(label, total=total, unit="img")
    start = clock()
    stamps: list[tuple[float, int]] = []
    seen = 0
    for batch in batches:
        seen += count_images(batch)
        stamps.append((clock(), seen))
        progress.update(seen)
    progress.finish(seen)
    if len(stamps) < STEADY_SKIP_BATCHES + 3:
        raise ValueError(
            f"{label}: {len(stamps)} batches are too few to time (at least {STEADY_SKIP_BATCHES + 3}); "
            "use more images or epochs"
        )

    def rate(a: tuple[float, int], b: tuple[float, int]) -> float:
        return (b[1] - a[1]) / (b[0] - a[0])

    return {
        "img_per_s": rate(stamps[STEADY_SKIP_BATCHES], stamps[-1]),
        "after_first_img_per_s": rate(stamps[0], stamps[-1]),
        "from_start_img_per_s": rate((start, 0), stamps[-1]),
    }


def official_loader_throughput(corpus: str, size: int, workers: int, batch_size: int, epochs: int) -> dict:
    """(a): the official main_moco.py data path, measured in images/s (see :func:`_timed_consumption`)."""
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
    inputs = InputBuffers()  # as the training worker prepares its batches

    def model_input(batch: dict) -> int:
        inputs.prepare("query", batch["query"], config, generator)
        inputs.prepare("key", batch["key"], config, generator)
        return batch["query"].shape[0]

    rates = _timed_consumption(
        stream.training_batches(batch_size, StreamProgress(layout.total_lanes)),
        model_input,
        f"bench ingest: ours {config.size}px blur={config.blur} photometric={config.photometric}",
        total=(collection.num_images or 0) * epochs,
    )
    import ray

    return {**rates, "counters": ray.get(stream.ingest_state.snapshot.remote())}


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


def normalise_ms_per_batch(config: AugmentConfig, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds to turn one batch of uint8 views into model input on this CPU, into a
    fresh output each time and into the reused buffer the training worker keeps (InputBuffers)."""
    views = torch.randint(0, 256, (batch_size, config.size, config.size, 3), dtype=torch.uint8)
    buffers = InputBuffers()
    cpu = torch.device("cpu")
    return {
        "fresh_output": round(median_milliseconds(lambda: prepare_model_input(views, config), repeats, cpu), 2),
        "reused_buffer": round(median_milliseconds(lambda: buffers.prepare("query", views, config), repeats, cpu), 2),
    }


def _load_image_bytes(corpus: str, limit: int) -> list[bytes]:
    paths = sorted(Path(corpus).glob("*/*.jpg"))[:limit]
    return [path.read_bytes() for path in paths]


#: the variants of our augmentation measured, as changes to the like-for-like one
VARIANTS: dict[str, dict[str, str]] = {
    "like_for_like": {},
    "gaussian_blur": {"blur": "gaussian"},
    "photometric_device": {"blur": "gaussian", "photometric": "device"},
}


def _augment(size: int, variant: str) -> AugmentConfig:
    return replace(AugmentConfig(recipe="v2", size=size, photometric="cpu", blur="pil"), **VARIANTS[variant])


def measure_path(
    path: str,
    variant: str,
    size: int,
    corpus: str,
    shards: str,
    workers: int,
    batch_size: int,
    epochs: int,
    single_process_images: int,
) -> dict:
    """One measurement in this process (run by :func:`run_ingest_benchmark` in a fresh one):
    ``path`` is ``official`` (a), ``single`` (b) or ``ours`` (c)."""
    config = _augment(size, variant)
    if path == "official":
        return official_loader_throughput(corpus, size, workers, batch_size, epochs)
    if path == "single":
        result = {"img_per_s": single_process_throughput(_load_image_bytes(corpus, single_process_images), config)}
        if config.photometric == "device":
            result["consumer_ms_per_img"] = consumer_cost_ms_per_image(config, batch_size)
        else:
            result.update(
                {f"normalise_ms_{name}": value for name, value in normalise_ms_per_batch(config, batch_size).items()}
            )
        return result
    with local_ray(workers):
        return ray_pipeline_throughput(shards, config, workers, batch_size, epochs)


def _window_figures(rounds: dict[tuple[str, str], list[dict]], window: str) -> dict:
    """The like-for-like medians and their ratio over another timing window of :func:`_timed_consumption`."""
    official = median_of(rounds[("official", "like_for_like")], f"{window}_img_per_s")
    ours = median_of(rounds[("ours", "like_for_like")], f"{window}_img_per_s")
    return {"official_img_per_s": official, "ours_img_per_s": ours, "ratio": round(ours / official, 3)}


def _size_summary(rounds: dict[tuple[str, str], list[dict]], workers: int) -> dict:
    """One size's figures: the medians of its rounds, ratios of those medians, every round's img/s."""

    def median(path: str, variant: str = "like_for_like", key: str = "img_per_s") -> float:
        return median_of(rounds[(path, variant)], key)

    official, ours, single = median("official"), median("ours"), median("single")
    return {
        "official_img_per_s": official,
        "ours_img_per_s": ours,
        "ratio": round(ours / official, 3),
        "single_process_img_per_s": single,
        "efficiency": round(ours / (single * workers), 3),
        "other_windows": {window: _window_figures(rounds, window) for window in ("after_first", "from_start")},
        "runs": {
            f"{path}_{variant}": [round(run["img_per_s"], 1) for run in runs]
            for (path, variant), runs in rounds.items()
        },
        "variants": {
            "gaussian_blur": {
                "ours_img_per_s": median("ours", "gaussian_blur"),
                "single_process_img_per_s": median("single", "gaussian_blur"),
            },
            "photometric_device": {
                "ours_img_per_s": median("ours", "photometric_device"),
                "single_process_img_per_s": median("single", "photometric_device"),
                "consumer_ms_per_img": median("single", "photometric_device", "consumer_ms_per_img"),
            },
        },
        "normalise_ms_per_batch": {
            name: median("single", "like_for_like", f"normalise_ms_{name}")
            for name in ("fresh_output", "reused_buffer")
        },
        "skipped": max(run["counters"]["skipped"] for run in rounds[("ours", "like_for_like")]),
    }


def run_ingest_benchmark(
    work_dir: str | None = None,
    num_images: int = 2000,
    sizes: tuple[int, ...] = (224, 64),
    workers: int = 2,
    batch_size: int = 256,
    epochs: int = 3,
    single_process_images: int = 300,
    repeats: int = 1,
) -> dict:
    """Build (or reuse) the corpus and its shards, then measure (a), (b) and (c) at each size,
    every measurement in a fresh process, in ``repeats`` interleaved rounds (medians reported;
    ``runs`` keeps every round)."""
    corpus, shards_dir = corpus_with_shards(work_dir, num_images)
    settings = {
        "corpus": corpus["path"],
        "shards": shards_dir,
        "workers": workers,
        "batch_size": batch_size,
        "epochs": epochs,
        "single_process_images": single_process_images,
    }
    paths = [("official", "like_for_like")] + [(path, variant) for variant in VARIANTS for path in ("ours", "single")]
    results: dict = {
        "benchmark": "ingest",
        "config": {
            "num_images": num_images,
            "workers": workers,
            "batch_size": batch_size,
            "epochs": epochs,
            "repeats": repeats,
            "recipe": "v2",
            "corpus_mean_kb": corpus["mean_kb"],
            "shards": shards_dir,
        },
        "machine": machine_info(torch.device("cpu")),
        "by_size": {},
    }
    for size in sizes:
        rounds: dict[tuple[str, str], list[dict]] = {}
        for _ in range(repeats):
            for path, variant in paths:
                result = measure_in_fresh_process(
                    "benchmarks.bench_ingest:measure_path",
                    f"bench ingest {size}px {path} {variant}",
                    path=path,
                    variant=variant,
                    size=size,
                    **settings,
                )
                rounds.setdefault((path, variant), []).append(result)

        results["by_size"][str(size)] = _size_summary(rounds, workers)
    headline = results["by_size"][str(sizes[0])]
    results["ratio"] = headline["ratio"]
    results["efficiency"] = headline["efficiency"]
    return results
