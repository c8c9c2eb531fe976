"""``moco shard``: image folders, path lists and WebDataset tars -> Parquet shards (docs/DATA.md).

The work is planned up front in the calling process: every source is listed and sorted, file items
are shuffled with a fixed seed and cut into shards, so shard names and contents depend only on the
inputs and options, never on the number of workers. Worker processes then validate the images and
write the shards. Each shard is written under a temporary name and renamed when complete, and every
finished shard is appended to a log, so a killed run resumes where it stopped; the manifest is
written last.

This module is the entry point: it runs the steps below, the worker processes and the manifest.

* :mod:`~pipelines.ingest.shard_listing` -- classify the sources and list their images;
* :mod:`~pipelines.ingest.shard_plan` -- options, and the plan that cuts the images into shards;
* :mod:`~pipelines.ingest.shard_output` -- the output directory: lock, conflicts, resume, log;
* :mod:`~pipelines.ingest.shard_writer` -- validate the images and write one task's shards.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moco_core.image_io import ImageLimits
from pipelines.console import Progress, note
from pipelines.ingest.schema import MANIFEST_NAME, Manifest
from pipelines.ingest.shard_listing import resolve_sources
from pipelines.ingest.shard_output import (
    LOG_NAME,
    OutputConflictError,
    ShardLog,
    checked_output_dir,
    load_finished_shards,
    locked_directory,
    log_header,
    remove_stale_temporaries,
    write_if_changed,
)
from pipelines.ingest.shard_plan import (
    DEFAULT_IMAGES_PER_SHARD,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_ROW_GROUP_SIZE,
    ShardOptions,
    ShardPlan,
    ShardTask,
    options_record,
    plan_shards,
)
from pipelines.ingest.shard_writer import ShardResult, build_task, prepare_image
from pipelines.ingest.webdataset import IMAGE_EXTENSIONS

__all__ = [
    "DEFAULT_IMAGES_PER_SHARD",
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_ROW_GROUP_SIZE",
    "LOG_NAME",
    "OutputConflictError",
    "ShardOptions",
    "ShardReport",
    "build_shards",
    "plan_shards",
    "prepare_image",
    "resolve_sources",
]


# ----------------------------------------------------------------------------------------------
# Public entry point


@dataclass
class ShardReport:
    """The outcome of :func:`build_shards`, JSON-able through :meth:`as_dict`."""

    output: str
    manifest: str
    num_images: int
    num_shards: int
    num_skipped: int
    skipped_by_reason: dict[str, int]
    num_converted: int
    converted_by_mode: dict[str, int]
    num_ignored: int
    num_hidden: int
    num_classes: int
    shards_built: int
    shards_reused: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_shards(
    sources: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    max_side: int | None = None,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    min_side: int = ImageLimits.min_side,
    max_pixels: int = ImageLimits.max_pixels,
    shuffle_seed: int | None = 0,
    workers: int | None = None,
    show_progress: bool = True,
) -> ShardReport:
    """Write Parquet shards (``SHARD_SCHEMA``) and ``_manifest.json`` for image collections.

    Bad images are skipped and recorded in the manifest with a reason; they never stop the run.
    Rerunning on the same output keeps finished shards and builds only the missing ones.

    Args:
        sources: image folders (class subfolders give labels), text files of image paths
            (``path[TAB label]`` per line) or WebDataset ``.tar`` files, in any mix.
        output_dir: where shards and the manifest go; created if missing.
        images_per_shard, row_group_size, max_side, jpeg_quality, min_side, max_pixels,
            shuffle_seed: see :class:`ShardOptions`.
        workers: processes validating and writing shards; default ``os.cpu_count()``. 1 runs
            everything in this process.
        show_progress: print progress lines on stderr.

    Returns:
        Counts of images, shards, skipped / converted / ignored files and timing.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a source of unknown kind, a bad option, or (``OutputConflictError``) an
            output directory holding shards made from other inputs or options.
    """
    start = time.monotonic()
    options = ShardOptions(
        images_per_shard=images_per_shard,
        row_group_size=row_group_size,
        max_side=max_side,
        jpeg_quality=jpeg_quality,
        min_side=min_side,
        max_pixels=max_pixels,
        shuffle_seed=shuffle_seed,
    )
    options.validate()
    worker_count = _resolve_worker_count(workers)
    resolved_sources = resolve_sources(sources)
    output = checked_output_dir(Path(output_dir))

    with contextlib.ExitStack() as stack:
        counter = multiprocessing.get_context("spawn").Value("q", 0)
        pool = None
        num_tars = sum(kind == "tar" for kind, _ in resolved_sources)
        if worker_count > 1 and num_tars > 1:
            pool = stack.enter_context(_process_pool(worker_count, counter))
        plan = plan_shards(resolved_sources, options, exclude=output, parallel_map=pool.map if pool else None)
        if not plan.num_images:
            raise ValueError(f"no images in {', '.join(plan.sources)}{_what_was_not_taken(plan)}")
        _note_plan(plan, show_progress)
        output.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked_directory(output))
        finished = load_finished_shards(output, plan, options)
        remove_stale_temporaries(output, plan)
        missing = [name for name in plan.shard_names if name not in finished]
        num_tasks = len(plan.tasks_for(missing))
        if pool is None and worker_count > 1 and num_tasks > 1:
            # Started only now, and no larger than the work: each worker costs an interpreter start.
            pool = stack.enter_context(_process_pool(min(worker_count, num_tasks), counter))
        if missing:
            with ShardLog(output / LOG_NAME, log_header(plan, options)) as log:
                for result in _build_missing_shards(plan, missing, output, options, pool, counter, show_progress):
                    finished[result.name] = result
                    log.record(result)
        manifest = _manifest_for(plan, options, finished)
        manifest_path = output / MANIFEST_NAME
        write_if_changed(manifest_path, manifest.to_json())
        with contextlib.suppress(FileNotFoundError):
            (output / LOG_NAME).unlink()  # the manifest now holds everything the log did
    return _report(manifest, output, manifest_path, len(missing), time.monotonic() - start)


def _note_plan(plan: ShardPlan, show: bool) -> None:
    if not show:
        return
    note(
        f"moco shard: planned {plan.num_images} images in {len(plan.shard_names)} shards "
        f"from {len(plan.sources)} sources ({len(plan.class_names)} classes)"
    )
    if plan.num_ignored:
        examples = ", ".join(plan.ignored_examples)
        note(f"moco shard: ignored {plan.num_ignored} files without an image extension (e.g. {examples})")
    if plan.num_hidden:
        examples = ", ".join(plan.hidden_examples)
        note(f"moco shard: ignored {plan.num_hidden} hidden files (e.g. {examples})")
    if plan.skipped:
        first = plan.skipped[0]
        note(f"moco shard: {len(plan.skipped)} problems while listing, e.g. {first.source}: {first.reason}")


def _what_was_not_taken(plan: ShardPlan) -> str:
    """`` (ignored ...)``: what listing found that is not an image, for the no-images error."""
    parts = []
    if plan.num_ignored:
        parts.append(f"{plan.num_ignored} files without an image extension, e.g. {plan.ignored_examples[0]}")
    if plan.num_hidden:
        parts.append(f"{plan.num_hidden} hidden files, e.g. {plan.hidden_examples[0]}")
    if plan.skipped:
        parts.append(f"{len(plan.skipped)} unreadable, e.g. {plan.skipped[0].source}: {plan.skipped[0].reason}")
    if not parts:
        return f" (image extensions: {', '.join(IMAGE_EXTENSIONS)})"
    return f" (ignored {'; '.join(parts)}; image extensions: {', '.join(IMAGE_EXTENSIONS)})"


# ----------------------------------------------------------------------------------------------
# Running the shard tasks


def _resolve_worker_count(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


@contextlib.contextmanager
def _process_pool(worker_count: int, counter: Any) -> Iterator[Any]:
    """A ``multiprocessing.Pool`` that is terminated on the way out, also on Ctrl-C.

    Workers ignore SIGINT: the main process alone handles it and terminates them, which never
    hangs (an interrupted ``ProcessPoolExecutor`` can). Their half-written temporaries are
    removed by the next run.
    """
    # spawn: forking a process that already runs pyarrow's threads is not safe.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(worker_count, initializer=_init_worker, initargs=(counter,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


_worker_counter: Any = None


def _init_worker(counter: Any) -> None:
    global _worker_counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_counter = counter


def _count_item_in_worker() -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += 1


def _run_task_in_worker(arguments: tuple[ShardTask, frozenset[str], Path, ShardOptions]) -> list[ShardResult]:
    task, wanted, output, options = arguments
    return build_task(task, wanted, output, options, _count_item_in_worker)


def _build_missing_shards(
    plan: ShardPlan,
    missing: list[str],
    output: Path,
    options: ShardOptions,
    pool: Any,
    counter: Any,
    show_progress: bool,
) -> Iterator[ShardResult]:
    """Build the ``missing`` shards, yielding each task's results as it finishes."""
    wanted = frozenset(missing)
    tasks = plan.tasks_for(missing)
    total = sum(plan.planned_images[name] for name in missing)
    progress = Progress("moco shard", total=total, unit="img") if show_progress else None
    if show_progress and len(missing) < len(plan.shard_names):
        note(f"moco shard: resuming, {len(plan.shard_names) - len(missing)} shards already done")

    if pool is None:
        done = 0

        def count_item() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress.update(done)

        for task in tasks:
            yield from build_task(task, wanted, output, options, count_item)
    else:
        arguments = [(task, wanted, output, options) for task in tasks]
        results = pool.imap_unordered(_run_task_in_worker, arguments)
        for _ in tasks:
            while True:
                try:
                    task_results = results.next(timeout=1.0)
                    break
                except multiprocessing.TimeoutError:
                    if progress is not None:
                        progress.update(counter.value)
            yield from task_results
        done = counter.value
    if progress is not None:
        progress.finish(done)


# ----------------------------------------------------------------------------------------------
# Manifest and report


def _manifest_for(plan: ShardPlan, options: ShardOptions, results: dict[str, ShardResult]) -> Manifest:
    """The manifest, in plan order; listing problems come first in ``skipped``."""
    skipped = list(plan.skipped)
    shards = []
    converted: Counter[str] = Counter()
    for name in plan.shard_names:
        result = results[name]
        shards.append(
            {
                "path": name,
                "num_images": result.num_images,
                "num_row_groups": result.num_row_groups,
                "num_bytes": result.num_bytes,
                "num_skipped": len(result.skipped),
                "skipped_offset": len(skipped),
                "converted_by_mode": result.converted_by_mode,
            }
        )
        skipped.extend(result.skipped)
        converted.update(result.converted_by_mode)
    return Manifest(
        num_images=sum(shard["num_images"] for shard in shards),
        num_shards=len(shards),
        shards=shards,
        class_names=plan.class_names,
        skipped=skipped,
        sources=plan.sources,
        max_side=options.max_side,
        fingerprint=plan.fingerprint,
        options=options_record(options),
        converted_by_mode=dict(sorted(converted.items())),
        num_ignored=plan.num_ignored,
        num_hidden=plan.num_hidden,
    )


def _report(manifest: Manifest, output: Path, manifest_path: Path, shards_built: int, seconds: float) -> ShardReport:
    reasons = Counter(skip.reason for skip in manifest.skipped)
    return ShardReport(
        output=str(output),
        manifest=str(manifest_path),
        num_images=manifest.num_images,
        num_shards=manifest.num_shards,
        num_skipped=len(manifest.skipped),
        skipped_by_reason=dict(sorted(reasons.items())),
        num_converted=sum(manifest.converted_by_mode.values()),
        converted_by_mode=manifest.converted_by_mode,
        num_ignored=manifest.num_ignored,
        num_hidden=manifest.num_hidden,
        num_classes=len(manifest.class_names),
        shards_built=shards_built,
        shards_reused=manifest.num_shards - shards_built,
        seconds=round(seconds, 3),
    )
