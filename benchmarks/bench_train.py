"""``moco bench train``: the Ray Train pretraining job against a bare training loop, same work.

In one run, on the same corpus, model, augmentation, batch and threads:

* baseline: ``moco_core.train_step`` in one process, fed by a torch ``DataLoader`` whose workers
  run the same per-image two-view transform on the JPEG files;
* ours: ``moco pretrain``'s Ray Train job with one worker, fed by the Ray Data stream.

Both are timed in steady state (after ``warmup`` steps); ``ratio`` = ours / baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from benchmarks.corpus import corpus_with_shards
from pipelines.console import Progress

BENCH_OVERRIDES = [
    "model.arch=resnet18",
    "model.head=mlp",
    "model.queue_size=4096",
    "model.temperature=0.2",
    "model.batchnorm=split",
    "model.bn_splits=8",
    "augment.recipe=v2",
    "optim.schedule=cosine",
    "checkpoint.every_steps=0",
    "checkpoint.at_epoch_end=false",
    "eval.every_epochs=0",
    "tracking.enabled=false",
    "scaling.workers=1",
    "scaling.cpus_per_worker=1",
]


class _FileTwoViews(torch.utils.data.Dataset):
    """JPEG files -> (query, key) uint8 views with our per-image transform."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        rng = np.random.default_rng((index, time.monotonic_ns()))
        (query, key), _ = self.transform(self.paths[index].read_bytes(), rng)
        return torch.from_numpy(query), torch.from_numpy(key)


def bare_loop_throughput(config, corpus: str, steps: int, warmup: int, loader_workers: int) -> float:
    """Images/s of train_step fed by a DataLoader, after ``warmup`` steps."""
    from moco_core.model import build_model
    from moco_core.photometric import prepare_model_input
    from moco_core.schedules import build_lr_schedule
    from moco_core.training import build_optimizer, train_step
    from pipelines.ingest.views import TwoViewFunction
    from pipelines.pretrain.worker import compute_settings

    device = torch.device("cpu")
    settings = compute_settings(config, device)
    augment = config.augment.resolve(on_gpu=False)
    model = build_model(config.model)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optim.weight_decay, config.optim.sgd_momentum)
    lr = build_lr_schedule(config.optim.schedule, config.base_lr, steps + warmup)
    paths = sorted(Path(corpus).glob("*/*.jpg"))
    loader = torch.utils.data.DataLoader(
        _FileTwoViews(paths, TwoViewFunction(augment)),
        batch_size=config.optim.batch_size,
        shuffle=True,
        num_workers=loader_workers,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=4,
    )
    progress = Progress("bench train: bare loop", total=steps + warmup, unit="step")
    done, start = 0, time.perf_counter()
    while done < steps + warmup:
        for query, key in loader:
            if done == warmup:
                start = time.perf_counter()
            train_step(
                model,
                optimizer,
                prepare_model_input(query, augment),
                prepare_model_input(key, augment),
                lr=lr(done),
                momentum=config.momentum.base,
                settings=settings,
            )
            done += 1
            progress.update(done)
            if done == steps + warmup:
                break
    progress.finish(done)
    return steps * config.optim.batch_size / (time.perf_counter() - start)


def ray_job_throughput(config, shards: str, warmup: int) -> dict:
    """Images/s of the pretraining job in steady state, from its logged windows after ``warmup``."""
    import json

    from pipelines.pretrain.driver import run_pretraining

    run_dir = Path(tempfile.mkdtemp(prefix="moco-bench-train-"))
    summary = run_pretraining(config, [shards], str(run_dir))
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [row for row in windows if row["step"] > warmup and "images_per_s" in row]
    return {
        "img_per_s": statistics.median(row["images_per_s"] for row in steady),
        "data_wait_fraction": statistics.median(row["data_wait_fraction"] for row in steady),
        "steps": summary["steps"],
    }


def run_train_benchmark(
    work_dir: str | None = None,
    num_images: int = 2000,
    size: int = 64,
    batch_size: int = 64,
    steps: int = 60,
    warmup: int = 10,
    threads: int = 2,
) -> dict:
    """Measure both paths on the same corpus and settings; ``ratio`` = Ray job / bare loop."""
    import ray

    from pipelines.pretrain.config import load_config

    corpus, shards = corpus_with_shards(work_dir, num_images)
    overrides = BENCH_OVERRIDES + [
        f"augment.size={size}",
        f"optim.batch_size={batch_size}",
        f"training.total_steps={steps + warmup}",
        f"training.log_every_steps={max(1, steps // 12)}",
        f"training.torch_threads={threads}",
    ]
    config = load_config("in1m-v2", overrides)
    torch.set_num_threads(threads)
    bare = bare_loop_throughput(config, corpus["path"], steps, warmup, loader_workers=1)
    ray.init(num_cpus=2, configure_logging=False)
    try:
        ours = ray_job_throughput(config, shards, warmup)
    finally:
        ray.shutdown()
    return {
        "benchmark": "train",
        "config": {
            "arch": "resnet18",
            "size": size,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "torch_threads": threads,
            "ray_workers": 1,
            "ray_readers": 1,
            "dataloader_workers": 1,
            "num_images": num_images,
        },
        "machine": machine_info(torch.device("cpu")),
        "bare_loop_img_per_s": round(bare, 1),
        "ray_job_img_per_s": round(ours["img_per_s"], 1),
        "ray_job_data_wait_fraction": round(ours["data_wait_fraction"], 3),
        "ratio": round(ours["img_per_s"] / bare, 3),
    }
