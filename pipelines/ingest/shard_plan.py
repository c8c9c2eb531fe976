"""Plan ``moco shard``: cut the listed images into named shards, fixed by the inputs and options.

File items are shuffled with a fixed seed before they are cut; tar samples keep their tar order.
Shard names and contents never depend on the number of workers, and the plan's fingerprint lets a
rerun recognise shards it made before.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moco_core.image_io import ImageLimits
from pipelines.ingest.schema import SCHEMA_VERSION, SkippedFile
from pipelines.ingest.shard_listing import SourceListing, list_sources

#: ~2048 images of ~100-150 kB (ImageNet / web JPEGs) make shards of a few hundred MB.
DEFAULT_IMAGES_PER_SHARD = 2048
#: Row groups are the unit of parallel reading and of shuffling: a few hundred images, ~30 MB.
DEFAULT_ROW_GROUP_SIZE = 256
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class ShardOptions:
    """Everything that decides shard contents (the worker count does not).

    Attributes:
        images_per_shard: planned images per shard; skipped images make a shard smaller.
        row_group_size: images per Parquet row group.
        max_side: when set, images whose longer side exceeds it are stored as a downscaled JPEG.
        jpeg_quality: quality of those downscaled JPEGs.
        min_side: images whose shorter side is below this are skipped (``too_small``).
        max_pixels: images above this many pixels are skipped (``too_large``, decompression bombs).
        shuffle_seed: seed of the shuffle of folder and list items before they are cut into
            shards (class folders would otherwise give single-class shards); None keeps the
            sorted order. WebDataset samples keep their tar order.
    """

    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    max_side: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    min_side: int = ImageLimits.min_side
    max_pixels: int = ImageLimits.max_pixels
    shuffle_seed: int | None = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad option."""
        for name in ("images_per_shard", "row_group_size", "min_side", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_side is not None and self.max_side < self.min_side:
            raise ValueError(f"max_side must be >= min_side ({self.min_side}), got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(min_side=self.min_side, max_pixels=self.max_pixels)


@dataclass(frozen=True)
class FileItem:
    path: str
    key: str
    label: int | None


@dataclass(frozen=True)
class FileShard:
    """One shard of images read from files (folders and path lists)."""

    name: str
    items: tuple[FileItem, ...]


@dataclass(frozen=True)
class TarShard:
    """The next ``len(keys)`` image samples of a tar, in tar order, stored under these keys."""

    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class TarTask:
    """All shards of one tar, built by one worker in a single pass over the tar."""

    tar_path: str
    shards: tuple[TarShard, ...]


ShardTask = FileShard | TarTask


@dataclass
class ShardPlan:
    """What ``build_shards`` will write: shards in order, and what listing the sources found."""

    sources: list[str]  # absolute paths
    tasks: list[ShardTask]
    shard_names: list[str]
    planned_images: dict[str, int]  # shard name -> planned image count
    class_names: list[str]
    skipped: list[SkippedFile]  # found while listing: unreadable folders, broken tars
    num_ignored: int  # files and tar samples without an image extension
    ignored_examples: list[str]
    num_hidden: int  # hidden files in the folders
    hidden_examples: list[str]
    fingerprint: str

    @property
    def num_images(self) -> int:
        return sum(self.planned_images.values())

    def tasks_for(self, shard_names: list[str]) -> list[ShardTask]:
        """The tasks that write any of ``shard_names``."""
        wanted = frozenset(shard_names)
        return [task for task in self.tasks if any(name in wanted for name, _ in _planned_counts(task))]


def plan_shards(
    sources: list[tuple[str, Path]],
    options: ShardOptions,
    *,
    exclude: Path | None = None,
    parallel_map: Callable[..., Iterable[Any]] | None = None,
) -> ShardPlan:
    """List every source and cut the items into named shards.

    Args:
        sources: from :func:`~pipelines.ingest.shard_listing.resolve_sources`.
        options: shard size and shuffle seed are used here; all options enter the fingerprint.
        exclude: a folder never listed (the output directory, when it lies inside a source).
        parallel_map: a ``map(function, items)`` over worker processes, to list tars in parallel.

    Returns:
        The plan; the same inputs and options always give the same plan.
    """
    listings = list_sources(sources, exclude, parallel_map or map)
    class_names = sorted(set().union(*(listing.class_names for listing in listings)))
    _make_keys_unique(listings)
    tasks = _cut_into_shards(sources, listings, class_names, options)
    planned = {name: count for task in tasks for name, count in _planned_counts(task)}
    return ShardPlan(
        sources=[str(path) for _, path in sources],
        tasks=tasks,
        shard_names=list(planned),
        planned_images=planned,
        class_names=class_names,
        skipped=[skip for listing in listings for skip in listing.skipped],
        num_ignored=sum(listing.num_ignored for listing in listings),
        ignored_examples=[example for listing in listings for example in listing.ignored_examples][:5],
        num_hidden=sum(listing.num_hidden for listing in listings),
        hidden_examples=[example for listing in listings for example in listing.hidden_examples][:5],
        fingerprint=_fingerprint(sources, tasks, class_names, options),
    )


def _cut_into_shards(
    sources: list[tuple[str, Path]], listings: list[SourceListing], class_names: list[str], options: ShardOptions
) -> list[ShardTask]:
    """Shards never span two sources; a tar's shards form one task, read in one pass."""
    class_index = {name: index for index, name in enumerate(class_names)}
    chunked: list[tuple[str, Path, list[Any]]] = []
    for (kind, path), listing in zip(sources, listings):
        if kind == "tar":
            chunked.append((kind, path, _chunks(listing.tar_keys, options.images_per_shard)))
        else:
            items = [FileItem(file, key, _resolve_label(label, class_index)) for file, key, label in listing.files]
            if options.shuffle_seed is not None:
                random.Random(options.shuffle_seed).shuffle(items)
            chunked.append((kind, path, _chunks(items, options.images_per_shard)))
    # Names are given once all shards are counted: their width depends on the total.
    names = iter(_shard_names(sum(len(chunks) for _, _, chunks in chunked)))
    tasks: list[ShardTask] = []
    for kind, path, chunks in chunked:
        if kind == "tar" and chunks:
            tasks.append(TarTask(str(path), tuple(TarShard(next(names), tuple(keys)) for keys in chunks)))
        elif kind != "tar":
            tasks.extend(FileShard(next(names), tuple(items)) for items in chunks)
    return tasks


def _make_keys_unique(listings: list[SourceListing]) -> None:
    """Give later duplicates ``key~1``, ``key~2``... (e.g. ``a.jpg`` and ``a.png``, two sources)."""
    used: set[str] = set()

    def unique(key: str) -> str:
        candidate, suffix = key, 0
        while candidate in used:
            suffix += 1
            candidate = f"{key}~{suffix}"
        used.add(candidate)
        return candidate

    for listing in listings:
        listing.files = [(path, unique(key), label) for path, key, label in listing.files]
        listing.tar_keys = [unique(key) for key in listing.tar_keys]


def _resolve_label(label: int | str | None, class_index: dict[str, int]) -> int | None:
    return class_index[label] if isinstance(label, str) else label


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _shard_names(count: int) -> list[str]:
    width = max(5, len(str(max(count - 1, 0))))
    return [f"shard-{index:0{width}d}.parquet" for index in range(count)]


def _planned_counts(task: ShardTask) -> list[tuple[str, int]]:
    if isinstance(task, FileShard):
        return [(task.name, len(task.items))]
    return [(shard.name, len(shard.keys)) for shard in task.shards]


def options_record(options: ShardOptions) -> dict[str, Any]:
    """The options as recorded in the manifest and the shard log, and hashed into the fingerprint."""
    return {"schema_version": SCHEMA_VERSION, **asdict(options)}


def _fingerprint(
    sources: list[tuple[str, Path]], tasks: list[ShardTask], class_names: list[str], options: ShardOptions
) -> str:
    """Hash of everything that decides shard contents: options, sources and the item listing.

    Image bytes are not hashed (that would mean reading the whole collection twice); a file
    rewritten in place under the same name is not noticed.
    """
    digest = hashlib.sha256()
    header = {
        "options": options_record(options),
        "sources": [(kind, str(path)) for kind, path in sources],
        "class_names": class_names,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for task in tasks:
        if isinstance(task, FileShard):
            digest.update(f"\n{task.name}".encode())
            for item in task.items:
                digest.update(f"\n{item.path}\0{item.key}\0{item.label}".encode())
        else:
            for shard in task.shards:
                digest.update(f"\n{shard.name}\0{task.tar_path}\0".encode() + "\0".join(shard.keys).encode())
    return digest.hexdigest()[:16]
