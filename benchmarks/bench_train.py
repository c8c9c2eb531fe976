"""``moco bench train``: the Ray Train pretraining job against training loops without Ray, same work.

For each view size, on a corpus of that kind of image (ImageNet-like JPEGs for 64 and 224 px,
32 px photo crops for 32 px), with the same model, MoCo v2 augmentation and batch, and for each
trainer CPU count ``C`` (``trainer_cpus``; the job's ``scaling.cpus_per_worker``):

* ``step_alone``: ``moco_core.train_step`` on views computed beforehand (no data work at all),
  on the job's torch threads and with its ``training.host_allocator``: the job's ceiling, so
  ``job / step_alone`` is the job's own overhead;
* ``bare_loop``: ``train_step`` on the job's torch threads, fed by a torch ``DataLoader`` whose
  one worker process runs our per-image two-view transform on the image files, with the C
  library's allocator as it comes (as a user's script runs);
* ``bare_loop_reuse``: the same loop with the job's ``training.host_allocator`` setting (malloc
  keeps freed memory: pipelines/host_allocator.py), so the job's margin over ``bare_loop`` shows
  how much of it is that setting;
* ``job``: ``moco pretrain``'s Ray Train job with one worker reserving ``C`` CPUs (torch threads:
  ``C`` rounded up, ``PretrainConfig.trainer_threads``) and the reader lanes on the CPUs left,
  fed by the Ray Data stream;
* ``single_process`` (once per size, it does not depend on ``C``): what a short hand-written
  script does: one process, torchvision's MoCo v2 transforms (the official augmentation) applied
  per image in the loop, then ``train_step``, torch using every core.

One statistic everywhere: images/s over the same steps (after ``warmup``), from per-step times
for the loops and from the job's contiguous log windows. Every path runs in a new Python process,
as users run a script or ``moco pretrain`` (a job that followed other work in one process ran
15-20% slower at 64 px; docs/BENCHMARKS.md). With ``repeats`` > 1 every path runs once per round,
the rounds interleaved so slow spells of a shared machine hit them alike, and each figure is the
median of its rounds. ``wall_s`` is the whole run of
``warmup + steps`` steps including start-up (for the job: planning, Ray Train and Ray Data start;
the Ray cluster itself is started before).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import local_ray, machine_info, measure_in_fresh_process, median_of
from benchmarks.corpus import corpus_with_shards, default_work_dir, small_corpus_with_shards
from benchmarks.official import official_two_crops
from pipelines.console import Progress
from pipelines.host_allocator import apply_host_allocator

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
]
#: the paths measured once per trainer CPU count (``single_process`` does not depend on it)
JOB_AND_LOOPS = ("step_alone", "bare_loop", "bare_loop_reuse", "job")
#: view size -> batch size used for that size
DEFAULT_BATCH = {32: 128, 64: 64, 224: 32}


class _FileTwoViews(torch.utils.data.Dataset):
    """Image files -> (query, key) uint8 views with our per-image transform."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        rng = np.random.default_rng((index, time.monotonic_ns()))
        (query, key), _ = self.transform(self.paths[index].read_bytes(), rng)
        return torch.from_numpy(query), torch.from_numpy(key)


class _Steps:
    """The model, optimizer and schedule every baseline trains with, and per-step timestamps."""

    def __init__(self, config, total_steps: int, label: str):
        from moco_core.model import build_model
        from moco_core.schedules import build_lr_schedule
        from moco_core.training import build_optimizer
        from pipelines.pretrain.worker import compute_settings

        self.config = config
        model = build_model(config.model)
        self.settings, _ = compute_settings(config, torch.device("cpu"), model)
        self.model = model.to(memory_format=torch.channels_last) if self.settings.channels_last else model
        self.optimizer = build_optimizer(self.model, config.optim.weight_decay, config.optim.sgd_momentum)
        self.lr = build_lr_schedule(config.optim.schedule, config.base_lr, total_steps)
        self.total_steps = total_steps
        self.done = 0
        self.ended_at: list[float] = []
        self.progress = Progress(f"bench train: {label}", total=total_steps, unit="step")

    def step(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """One training step on model-ready views; False once ``total_steps`` are done."""
        from moco_core.training import train_step

        lr = self.lr(self.done)
        train_step(
            self.model, self.optimizer, query, key, lr=lr, momentum=self.config.momentum.base, settings=self.settings
        )
        self.done += 1
        self.ended_at.append(time.perf_counter())
        self.progress.update(self.done)
        return self.done < self.total_steps

    def images_per_s(self, warmup: int) -> float:
        """Images/s over the steps after ``warmup`` (from the end of step ``warmup`` to the last)."""
        timed = self.total_steps - warmup
        return timed * self.config.optim.batch_size / (self.ended_at[-1] - self.ended_at[warmup - 1])

    def figures(self, warmup: int, started: float, **extra: object) -> dict:
        """A path's result: images/s after ``warmup``, wall time since ``started``, the precision."""
        return {
            "img_per_s": self.images_per_s(warmup),
            "wall_s": time.perf_counter() - started,
            "precision": self.settings.precision,
            **extra,
        }


def step_alone(config, images: list[bytes], steps: int, warmup: int, threads: int) -> dict:
    """train_step on views computed beforehand, cycled."""
    from moco_core.photometric import prepare_model_input
    from pipelines.ingest.views import TwoViewFunction

    torch.set_num_threads(threads)
    augment = config.augment.resolve(on_gpu=False)
    views = TwoViewFunction(augment)
    rng = np.random.default_rng(0)
    batch = config.optim.batch_size
    pairs = [views(images[i % len(images)], rng)[0] for i in range(2 * batch)]
    query = [prepare_model_input(torch.from_numpy(np.stack([p[0] for p in pairs[s::2]])), augment) for s in (0, 1)]
    key = [prepare_model_input(torch.from_numpy(np.stack([p[1] for p in pairs[s::2]])), augment) for s in (0, 1)]
    start = time.perf_counter()
    loop = _Steps(config, steps + warmup, "train_step alone")
    while loop.step(query[loop.done % 2], key[loop.done % 2]):
        pass
    return loop.figures(warmup, start, torch_threads=threads)


def bare_loop(config, paths: list[Path], steps: int, warmup: int, threads: int) -> dict:
    """train_step fed by a DataLoader with one worker process running our per-image transform."""
    from moco_core.photometric import prepare_model_input
    from pipelines.ingest.views import TwoViewFunction

    torch.set_num_threads(threads)
    augment = config.augment.resolve(on_gpu=False)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        _FileTwoViews(paths, TwoViewFunction(augment)),
        batch_size=config.optim.batch_size,
        shuffle=True,
        num_workers=1,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=4,
    )
    loop = _Steps(config, steps + warmup, "DataLoader + train_step")
    running = True
    while running:
        for query, key in loader:
            if not (running := loop.step(prepare_model_input(query, augment), prepare_model_input(key, augment))):
                break
    return loop.figures(warmup, start, torch_threads=threads)


def single_process(config, paths: list[Path], steps: int, warmup: int) -> dict:
    """One process: torchvision's official MoCo v2 transforms per image in the loop, then train_step."""
    from PIL import Image

    two_crops = official_two_crops(config.augment.size, config.augment.crop_scale)
    batch = config.optim.batch_size
    order = np.random.default_rng(0).permutation(len(paths))
    start = time.perf_counter()
    loop = _Steps(config, steps + warmup, "single process")
    position = 0
    while True:
        chosen = [paths[order[(position + i) % len(paths)]] for i in range(batch)]
        position += batch
        crops = [two_crops(Image.open(path).convert("RGB")) for path in chosen]
        query = torch.stack([crop[0] for crop in crops]).contiguous(memory_format=torch.channels_last)
        key = torch.stack([crop[1] for crop in crops]).contiguous(memory_format=torch.channels_last)
        if not loop.step(query, key):
            break
    return loop.figures(warmup, start)


def job(config, shards: str, warmup: int) -> dict:
    """The pretraining job, timed over its log windows after ``warmup`` (windows of ``warmup`` steps)."""
    from pipelines.pretrain.driver import run_pretraining

    run_dir = Path(tempfile.mkdtemp(prefix="moco-bench-train-"))
    summary = run_pretraining(config, [shards], str(run_dir))
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in windows if row["step"] > warmup and "images_per_s" in row]
    images = len(timed) * config.training.log_every_steps * config.optim.batch_size
    seconds = sum(config.training.log_every_steps * config.optim.batch_size / row["images_per_s"] for row in timed)
    return {
        "img_per_s": images / seconds,
        "wall_s": summary["seconds"],
        "data_wait_fraction": float(np.mean([row["data_wait_fraction"] for row in timed])),
        "steps": summary["steps"],
        "precision": summary["precision"],
    }


def resolve_precision(overrides: list[str]) -> dict:
    """What ``training.precision`` resolves to for the bench's model on this CPU (``auto``: timed)."""
    from moco_core.model import build_model
    from pipelines.pretrain.config import load_config
    from pipelines.pretrain.worker import compute_settings

    config = load_config("in1m-v2", overrides)
    settings, _ = compute_settings(config, torch.device("cpu"), build_model(config.model))
    return {"precision": settings.precision}


def measure_path(path: str, overrides: list[str], corpus: str, shards: str, steps: int, warmup: int) -> dict:
    """One path, in this process (run by :func:`_case` in a fresh one)."""
    from pipelines.pretrain.config import load_config

    config = load_config("in1m-v2", overrides)
    files = sorted(Path(corpus).glob("*/*.*"))
    threads = config.trainer_threads  # the loops train on the job's torch threads
    if path in ("step_alone", "bare_loop_reuse"):  # the job's setting; bare_loop keeps malloc's own
        apply_host_allocator(config.training.host_allocator)
    if path == "step_alone":
        return step_alone(config, [file.read_bytes() for file in files[:64]], steps, warmup, threads)
    if path in ("bare_loop", "bare_loop_reuse"):
        return bare_loop(config, files, steps, warmup, threads)
    if path == "single_process":
        return single_process(config, files, steps, warmup)
    with local_ray(num_cpus=2):
        return job(config, shards, warmup)


def _case(
    size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    work: Path,
    num_images: int,
    trainer_cpus: tuple[float, ...],
    repeats: int,
) -> dict:
    """Every path at one view size, ``repeats`` interleaved rounds, each path in a fresh process;
    each figure is the median of its rounds (``runs`` keeps every round's ``img_per_s``)."""
    if size <= 32:
        corpus, shards = small_corpus_with_shards(work)
    else:
        corpus, shards = corpus_with_shards(work, num_images)
    overrides = BENCH_OVERRIDES + [
        f"augment.size={size}",
        f"optim.batch_size={batch_size}",
        f"training.total_steps={steps + warmup}",
        f"training.log_every_steps={warmup}",
    ]
    # Resolved once, so that every path and round trains in the same precision (each resolving
    # ``auto`` itself, they picked differently where fp32 and bf16 time close).
    precision = measure_in_fresh_process(
        "benchmarks.bench_train:resolve_precision", f"bench train {size}px precision", overrides=overrides
    )["precision"]
    overrides.append(f"training.precision={precision}")
    #: (trainer CPUs or None, path) -> the overrides it runs with
    paths: dict[tuple[str | None, str], list[str]] = {(None, "single_process"): overrides}
    cpus_labels = [f"{cpus:g}" for cpus in trainer_cpus]  # also the JSON keys
    for cpus in cpus_labels:
        for name in JOB_AND_LOOPS:
            paths[(cpus, name)] = overrides + [f"scaling.cpus_per_worker={cpus}"]
    rounds: dict[tuple[str | None, str], list[dict]] = {}
    for _ in range(repeats):
        for (cpus, name), path_overrides in paths.items():
            label = name if cpus is None else f"{name}, trainer CPUs {cpus}"
            result = measure_in_fresh_process(
                "benchmarks.bench_train:measure_path",
                f"bench train {size}px {label}",
                path=name,
                overrides=path_overrides,
                corpus=corpus["path"],
                shards=shards,
                steps=steps,
                warmup=warmup,
            )
            rounds.setdefault((cpus, name), []).append(result)
    medians = {
        key: {
            **{stat: median_of(runs, stat) for stat in runs[0]},
            "runs": [round(run["img_per_s"], 3) for run in runs],
        }
        for key, runs in rounds.items()
    }
    single = medians[(None, "single_process")]
    by_cpus: dict[str, dict] = {}
    for cpus in cpus_labels:
        figures = {name: medians[(cpus, name)] for name in JOB_AND_LOOPS}
        figures["torch_threads"] = figures["step_alone"]["torch_threads"]
        baselines = {name: figures[name] for name in JOB_AND_LOOPS if name != "job"} | {"single_process": single}
        figures["ratios"] = {
            name: round(figures["job"]["img_per_s"] / baseline["img_per_s"], 3) for name, baseline in baselines.items()
        }
        # Each round's job over the same round's baseline, then the median: a host that speeds up
        # or slows down between rounds moves both sides of a round alike.
        figures["paired_ratios"] = {
            name: round(statistics.median(job / base for job, base in zip(figures["job"]["runs"], baseline["runs"])), 3)
            for name, baseline in baselines.items()
        }
        by_cpus[cpus] = figures
    return {
        "corpus": corpus,
        "batch_size": batch_size,
        "precision": precision,
        "single_process": single,
        "trainer_cpus": by_cpus,
    }


def run_train_benchmark(
    work_dir: str | None = None,
    num_images: int = 2000,
    sizes: tuple[int, ...] = (32, 64),
    batch_sizes: dict[int, int] | None = None,
    steps: int = 60,
    warmup: int = 10,
    trainer_cpus: tuple[float, ...] = (1.0,),
    repeats: int = 1,
) -> dict:
    """Measure every path at each size and trainer CPU count, in ``repeats`` interleaved rounds
    (medians reported); per size, ``trainer_cpus[C]["ratios"]`` = job / each baseline. ``ratio``:
    job / bare loop at the first size and the first trainer CPU count."""
    work = Path(work_dir) if work_dir else default_work_dir()
    batches = {**DEFAULT_BATCH, **(batch_sizes or {})}
    trainer_cpus = tuple(dict.fromkeys(trainer_cpus))
    by_size = {
        str(size): _case(size, batches.get(size, 64), steps, warmup, work, num_images, trainer_cpus, repeats)
        for size in sizes
    }
    return {
        "benchmark": "train",
        "config": {
            "arch": "resnet18",
            "recipe": "v2",
            "steps": steps,
            "warmup": warmup,
            "repeats": repeats,
            "trainer_cpus": list(trainer_cpus),
            "job": "1 Ray Train worker reserving the trainer CPUs, reader lanes on the CPUs left",
        },
        "machine": machine_info(torch.device("cpu")),
        "by_size": by_size,
        "ratio": next(iter(by_size[str(sizes[0])]["trainer_cpus"].values()))["ratios"]["bare_loop"],
    }
