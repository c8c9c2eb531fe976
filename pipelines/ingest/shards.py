"""``moco shard``: image folders, path lists and WebDataset tars -> Parquet shards (docs/DATA.md).

The work is planned up front in the calling process: every source is listed and sorted, file items
are shuffled with a fixed seed and cut into shards, so shard names and contents depend only on the
inputs and options, never on the number of workers. Worker processes then validate the images and
write the shards. Each shard is written under a temporary name and renamed when complete, and every
finished shard is appended to a log, so a killed run resumes where it stopped; the manifest is
written last.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from moco_core.image_io import ImageDecodeError, ImageLimits, decode_rgb, open_image
from pipelines.console import Progress, note
from pipelines.ingest.schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_SCHEMA, Manifest, SkippedFile
from pipelines.ingest.webdataset import (
    IMAGE_EXTENSIONS,
    class_label,
    image_entry,
    iter_samples,
    split_member_name,
)

#: ~2048 images of ~100-150 kB (ImageNet / web JPEGs) make shards of a few hundred MB.
DEFAULT_IMAGES_PER_SHARD = 2048
#: Row groups are the unit of parallel reading and of shuffling: a few hundred images, ~30 MB.
DEFAULT_ROW_GROUP_SIZE = 256
DEFAULT_JPEG_QUALITY = 90

LOG_NAME = "_shard_log.jsonl"
# Shards are written as ``NAME.tmp-PID``: a process orphaned by a killed run never shares its
# half-written file with a rerun.
TEMPORARY_MARKER = ".tmp"
EXIF_ORIENTATION = 0x0112

# Image bytes are already compressed: compressing them again costs CPU for nothing.
_COMPRESSION = {"key": "snappy", "image": "none", "label": "snappy", "width": "snappy", "height": "snappy"}
# Min/max statistics of the image column would copy image bytes into the footer.
_STATISTICS_COLUMNS = ["key", "label", "width", "height"]
_INTEGER_LABEL = re.compile(r"[+-]?\d+")


class OutputConflictError(ValueError):
    """The output directory holds shards (or other Parquet files) that this plan did not make."""


# ----------------------------------------------------------------------------------------------
# Options, plan and results


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
    num_ignored: int
    ignored_examples: list[str]
    fingerprint: str

    @property
    def num_images(self) -> int:
        return sum(self.planned_images.values())


@dataclass
class ShardResult:
    """What a worker wrote into one shard."""

    name: str
    num_images: int
    num_row_groups: int
    num_bytes: int
    skipped: list[SkippedFile] = field(default_factory=list)
    converted_by_mode: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardResult:
        data = dict(data)
        data["skipped"] = [SkippedFile(**item) for item in data.get("skipped", [])]
        return cls(**data)


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
    num_classes: int
    shards_built: int
    shards_reused: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Public entry point


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
    output = _prepare_output_dir(Path(output_dir))

    with contextlib.ExitStack() as stack:
        counter = multiprocessing.get_context("spawn").Value("q", 0)
        pool = None
        num_tars = sum(kind == "tar" for kind, _ in resolved_sources)
        if worker_count > 1 and num_tars > 1:
            pool = stack.enter_context(_process_pool(worker_count, counter))
        plan = plan_shards(resolved_sources, options, exclude=output, parallel_map=pool.map if pool else None)
        _note_plan(plan, show_progress)
        stack.enter_context(_locked_directory(output))
        finished = _load_finished_shards(output, plan, options)
        _remove_stale_temporaries(output, plan)
        missing = [name for name in plan.shard_names if name not in finished]
        num_tasks = len(_tasks_for(plan, missing))
        if pool is None and worker_count > 1 and num_tasks > 1:
            # Started only now, and no larger than the work: each worker costs an interpreter start.
            pool = stack.enter_context(_process_pool(min(worker_count, num_tasks), counter))
        if missing:
            with _ShardLog(output / LOG_NAME, _log_header(plan, options)) as log:
                for result in _build_missing_shards(plan, missing, output, options, pool, counter, show_progress):
                    finished[result.name] = result
                    log.record(result)
        manifest = _manifest_for(plan, options, finished)
        manifest_path = output / MANIFEST_NAME
        _write_if_changed(manifest_path, manifest.to_json())
        with contextlib.suppress(FileNotFoundError):
            (output / LOG_NAME).unlink()  # the manifest now holds everything the log did
    return _report(manifest, output, manifest_path, len(missing), time.monotonic() - start)


# ----------------------------------------------------------------------------------------------
# Sources and planning


def resolve_sources(sources: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """Classify each source as ``"folder"``, ``"tar"`` or ``"list"`` by inspection.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: no sources, or a file that is neither a ``.tar`` nor a text file.
    """
    if not sources:
        raise ValueError("no sources given")
    resolved = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source not found: {source}")
        path = path.resolve()
        if path.is_dir():
            resolved.append(("folder", path))
        elif path.suffix.lower() == ".tar":
            resolved.append(("tar", path))
        elif _looks_like_text(path):
            resolved.append(("list", path))
        else:
            raise ValueError(f"{source}: not a folder, a WebDataset .tar or a text file of image paths (one per line)")
    return resolved


def _looks_like_text(path: Path) -> bool:
    """True for UTF-8 text without NUL bytes in the first 8 kB (an image or archive fails this)."""
    try:
        with open(path, "rb") as file:
            head = file.read(8192)
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class _Listing:
    """Items of one source before keys are made unique and labels resolved."""

    files: list[tuple[str, str, int | str | None]] = field(default_factory=list)  # path, key, label
    tar_keys: list[str] = field(default_factory=list)
    class_names: set[str] = field(default_factory=set)
    skipped: list[SkippedFile] = field(default_factory=list)
    num_ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)

    def ignore(self, name: str) -> None:
        self.num_ignored += 1
        if len(self.ignored_examples) < 5:
            self.ignored_examples.append(name)


def plan_shards(
    sources: list[tuple[str, Path]],
    options: ShardOptions,
    *,
    exclude: Path | None = None,
    parallel_map: Callable[..., Iterable[Any]] | None = None,
) -> ShardPlan:
    """List every source and cut the items into named shards.

    Args:
        sources: from :func:`resolve_sources`.
        options: shard size and shuffle seed are used here; all options enter the fingerprint.
        exclude: a folder never listed (the output directory, when it lies inside a source).
        parallel_map: a ``map(function, items)`` over worker processes, to list tars in parallel.

    Returns:
        The plan; the same inputs and options always give the same plan.
    """
    listings = _list_sources(sources, exclude, parallel_map or map)
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
        fingerprint=_fingerprint(sources, tasks, class_names, options),
    )


def _list_sources(
    sources: list[tuple[str, Path]], exclude: Path | None, parallel_map: Callable[..., Iterable[Any]]
) -> list[_Listing]:
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    tar_paths = [str(path) for kind, path in sources if kind == "tar"]
    tar_listings = dict(zip(tar_paths, parallel_map(_list_tar, tar_paths)))
    listings = []
    for kind, path in sources:
        if kind == "folder":
            listings.append(_list_folder(path, exclude_real))
        elif kind == "list":
            listings.append(_read_path_list(path))
        else:
            listings.append(tar_listings[str(path)])
    return listings


def _cut_into_shards(
    sources: list[tuple[str, Path]], listings: list[_Listing], class_names: list[str], options: ShardOptions
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


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS


def _list_folder(root: Path, exclude_real: str | None) -> _Listing:
    """A folder with subfolders is a class layout (top-level images stay unlabeled); else flat."""
    listing = _Listing()
    entries = _sorted_entries(str(root), listing)
    subfolders = [entry for entry in entries if _is_listed_dir(entry, exclude_real)]
    visited = {os.path.realpath(root)}
    for entry in entries:
        if not entry.is_dir():
            _add_file(listing, root, entry.name, entry.name, None)
    for subfolder in subfolders:
        listing.class_names.add(subfolder.name)
        _walk_class_folder(root, subfolder.path, subfolder.name, listing, visited, exclude_real)
    listing.files.sort(key=lambda item: item[1])
    return listing


def _sorted_entries(directory: str, listing: _Listing) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        listing.skipped.append(SkippedFile(directory, "unreadable", error.strerror or str(error)))
        return []


def _is_listed_dir(entry: os.DirEntry[str], exclude_real: str | None) -> bool:
    # Hidden folders are tool metadata (.git, .ipynb_checkpoints), never classes.
    if entry.name.startswith(".") or not entry.is_dir():
        return False
    return exclude_real is None or os.path.realpath(entry.path) != exclude_real


def _walk_class_folder(
    root: Path,
    directory: str,
    class_name: str,
    listing: _Listing,
    visited: set[str],
    exclude_real: str | None,
) -> None:
    real = os.path.realpath(directory)
    if real in visited:  # a symlink loop, or a class folder linked twice
        return
    visited.add(real)
    for entry in _sorted_entries(directory, listing):
        if _is_listed_dir(entry, exclude_real):
            _walk_class_folder(root, entry.path, class_name, listing, visited, exclude_real)
        elif not entry.is_dir():
            relative = os.path.relpath(entry.path, root).replace(os.sep, "/")
            _add_file(listing, root, relative, entry.name, class_name)


def _add_file(listing: _Listing, root: Path, relative: str, name: str, class_name: str | None) -> None:
    # Hidden files include macOS "._x.jpg" resource forks, which are not images.
    if name.startswith(".") or not _is_image_name(name):
        listing.ignore(relative)
        return
    listing.files.append((str(root / relative), os.path.splitext(relative)[0], class_name))


def _read_path_list(list_path: Path) -> _Listing:
    """``path[TAB label]`` per line; relative paths are relative to the list file's folder."""
    listing = _Listing()
    base = list_path.parent
    with open(list_path, encoding="utf-8") as file:
        try:
            lines = list(file)
        except UnicodeDecodeError as error:
            raise ValueError(f"{list_path}: not UTF-8 text ({error.reason})") from None
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        path_text, _, label_text = line.partition("\t")
        path_text, label_text = path_text.strip(), label_text.strip()
        label: int | str | None = None
        if _INTEGER_LABEL.fullmatch(label_text):
            label = int(label_text)
        elif label_text:
            label = label_text
            listing.class_names.add(label_text)
        listing.files.append((str(base / path_text), os.path.splitext(path_text)[0], label))
    return listing


def _list_tar(tar_path: str) -> _Listing:
    """The keys of a tar's image samples from its headers alone (runs in a worker).

    A truncated tar keeps the samples before the damage; the sample the damage falls in is
    dropped, exactly as ``iter_samples`` never yields it.
    """
    listing = _Listing()
    try:
        size = os.path.getsize(tar_path)
        archive = tarfile.open(tar_path, mode="r:")
    except tarfile.ReadError as error:
        listing.skipped.append(SkippedFile(tar_path, "corrupt", f"not a readable tar: {error}"))
        return listing
    except OSError as error:
        listing.skipped.append(SkippedFile(tar_path, "unreadable", error.strerror or str(error)))
        return listing
    current_key: str | None = None
    has_image = False
    try:
        with archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = split_member_name(member.name)
                if key != current_key:
                    _close_tar_sample(listing, tar_path, current_key, has_image)
                    current_key, has_image = key, False
                if member.offset_data + member.size > size:  # the sample it belongs to is dropped
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                has_image = has_image or extension in IMAGE_EXTENSIONS
    except (tarfile.TarError, OSError) as error:
        detail = f"{error}; kept the {len(listing.tar_keys)} samples before it"
        listing.skipped.append(SkippedFile(tar_path, "truncated", detail))
        return listing
    _close_tar_sample(listing, tar_path, current_key, has_image)
    return listing


def _close_tar_sample(listing: _Listing, tar_path: str, key: str | None, has_image: bool) -> None:
    if key is None:
        return
    if has_image:
        listing.tar_keys.append(key)
    else:
        listing.ignore(f"{tar_path}::{key}")


def _make_keys_unique(listings: list[_Listing]) -> None:
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


def _options_record(options: ShardOptions) -> dict[str, Any]:
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
        "options": _options_record(options),
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
    if plan.skipped:
        first = plan.skipped[0]
        note(f"moco shard: {len(plan.skipped)} problems while listing, e.g. {first.source}: {first.reason}")


# ----------------------------------------------------------------------------------------------
# The output directory: conflicts, resume, temporaries


def _prepare_output_dir(output: Path) -> Path:
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    return output.resolve()


@contextlib.contextmanager
def _locked_directory(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory so two runs never write the same shard."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: run unlocked
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputConflictError(f"another 'moco shard' is writing to {directory}") from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _log_header(plan: ShardPlan, options: ShardOptions) -> dict[str, Any]:
    return {"fingerprint": plan.fingerprint, "options": _options_record(options), "sources": plan.sources}


def _load_finished_shards(output: Path, plan: ShardPlan, options: ShardOptions) -> dict[str, ShardResult]:
    """Results of the shards already on disk, from the manifest and the log of a killed run.

    Raises:
        OutputConflictError: the directory holds shards from other inputs or options, or Parquet
            files no manifest accounts for.
    """
    manifest_path, log_path = output / MANIFEST_NAME, output / LOG_NAME
    records: dict[str, ShardResult] = {}
    owned = False
    if manifest_path.exists():
        manifest = _read_own_manifest(manifest_path)
        _check_same_plan(output, manifest.fingerprint, manifest.options, manifest.sources, plan, options)
        records.update(_results_from_manifest(manifest))
        owned = True
    if log_path.exists():
        header, logged = _read_log(log_path)
        if header is not None:
            _check_same_plan(output, header["fingerprint"], header["options"], header["sources"], plan, options)
            records.update(logged)  # later than the manifest: a resumed run rebuilt these
            owned = True
    if not owned:
        _refuse_foreign_parquet(output)
    planned = set(plan.shard_names)
    return {name: result for name, result in records.items() if name in planned and (output / name).is_file()}


def _read_own_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as error:
        raise OutputConflictError(f"{path} is not a manifest written by 'moco shard' ({error})") from None


def _check_same_plan(
    output: Path,
    fingerprint: str,
    old_options: dict[str, Any],
    old_sources: list[str],
    plan: ShardPlan,
    options: ShardOptions,
) -> None:
    if fingerprint == plan.fingerprint:
        return
    new_options = _options_record(options)
    changed = sorted(name for name in new_options if old_options.get(name) != new_options[name])
    if not fingerprint:
        reason = "its manifest has no plan fingerprint"
    elif changed:
        reason = "options differ: " + ", ".join(f"{n} {old_options.get(n)} -> {new_options[n]}" for n in changed)
    elif old_sources != plan.sources:
        reason = "the sources differ"
    else:
        reason = "the sources' contents changed (files added, removed or relabeled)"
    raise OutputConflictError(
        f"{output} holds shards built from other inputs or options ({reason}); "
        "choose another --output, or delete that directory to rebuild"
    )


def _refuse_foreign_parquet(output: Path) -> None:
    foreign = sorted(path.name for path in output.iterdir() if ".parquet" in path.name)
    if foreign:
        raise OutputConflictError(
            f"{output} already holds Parquet files not written by 'moco shard' (e.g. {foreign[0]}); "
            "choose an empty or new --output"
        )


def _results_from_manifest(manifest: Manifest) -> dict[str, ShardResult]:
    results = {}
    for entry in manifest.shards:
        offset, count = entry["skipped_offset"], entry["num_skipped"]
        results[entry["path"]] = ShardResult(
            name=entry["path"],
            num_images=entry["num_images"],
            num_row_groups=entry["num_row_groups"],
            num_bytes=entry["num_bytes"],
            skipped=manifest.skipped[offset : offset + count],
            converted_by_mode=entry["converted_by_mode"],
        )
    return results


def _read_log(path: Path) -> tuple[dict[str, Any] | None, dict[str, ShardResult]]:
    """The header and shard records of a log; a line cut short by a kill is ignored."""
    header: dict[str, Any] | None = None
    results: dict[str, ShardResult] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if header is None:
            if "fingerprint" not in record:
                return None, {}
            header = record
        else:
            result = ShardResult.from_dict(record)
            results[result.name] = result
    return header, results


def _remove_stale_temporaries(output: Path, plan: ShardPlan) -> None:
    """Delete half-written files of a killed run (only temporaries of names this plan owns)."""
    owned = {*plan.shard_names, MANIFEST_NAME}
    for entry in os.scandir(output):
        name, marker, _ = entry.name.partition(TEMPORARY_MARKER)
        if marker and name in owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class _ShardLog:
    """Append-only record of finished shards, so a killed run resumes where it stopped."""

    def __init__(self, path: Path, header: dict[str, Any]):
        header_needed = not path.exists() or _read_log(path)[0] is None
        self._file = open(path, "w" if header_needed else "a", encoding="utf-8")
        if header_needed:
            self._write_line(json.dumps(header))
        elif not path.read_bytes().endswith(b"\n"):
            self._write_line("")  # end a line cut short by a kill

    def _write_line(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, result: ShardResult) -> None:
        self._write_line(result.to_json())

    def __enter__(self) -> _ShardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, unless it already holds exactly that."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    temporary = path.with_name(f"{path.name}{TEMPORARY_MARKER}-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


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
    return _build_task(task, wanted, output, options, _count_item_in_worker)


def _tasks_for(plan: ShardPlan, shard_names: list[str]) -> list[ShardTask]:
    """The tasks that write any of ``shard_names``."""
    wanted = frozenset(shard_names)
    return [task for task in plan.tasks if any(name in wanted for name, _ in _planned_counts(task))]


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
    tasks = _tasks_for(plan, missing)
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
            yield from _build_task(task, wanted, output, options, count_item)
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


def _build_task(
    task: ShardTask, wanted: frozenset[str], output: Path, options: ShardOptions, count_item: Callable[[], None]
) -> list[ShardResult]:
    if isinstance(task, FileShard):
        return [_build_file_shard(task, output, options, count_item)]
    return _build_tar_shards(task, wanted, output, options, count_item)


# ----------------------------------------------------------------------------------------------
# Writing one shard


@dataclass(frozen=True)
class StoredImage:
    data: bytes  # the original bytes, or a downscaled JPEG
    width: int
    height: int
    converted_from: str | None  # the original mode when it was not RGB


def prepare_image(data: bytes, options: ShardOptions) -> StoredImage:
    """Validate ``data`` by decoding it fully; downscale it when ``options.max_side`` asks.

    Raises:
        ImageDecodeError: the bytes are not a usable image.
    """
    image = open_image(data, options.limits)
    width, height = image.size
    target = _fit_within(width, height, options.max_side, options.min_side)
    if target is None:
        decoded = decode_rgb(image)
        return StoredImage(data, width, height, decoded.converted_from)
    orientation = _exif_orientation(image)
    image.draft(None, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below target
    decoded = decode_rgb(image)
    resized = decoded.image.resize(target, Image.Resampling.BICUBIC)
    return StoredImage(_encode_jpeg(resized, options.jpeg_quality, orientation), *target, decoded.converted_from)


def _fit_within(width: int, height: int, max_side: int | None, min_side: int) -> tuple[int, int] | None:
    """The size that fits the longer side to ``max_side``, or None when no downscale is needed.

    The shorter side stays at least ``min_side`` (a panorama must not shrink to a 1-px strip, which
    the shards would otherwise hold although it is below the size limit).
    """
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 -- a malformed EXIF block only loses the orientation
        return None
    return orientation if isinstance(orientation, int) and orientation != 1 else None


def _encode_jpeg(image: Image.Image, quality: int, orientation: int | None) -> bytes:
    # Keep the orientation tag so readers rotate the copy exactly as they would the original.
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


class _ShardWriter:
    """Collects the rows of one shard, writes a row group whenever one is full, and counts."""

    def __init__(self, output: Path, name: str, row_group_size: int):
        self.name = name
        self.path = output / name
        self.temporary_path = output / f"{name}{TEMPORARY_MARKER}-{os.getpid()}"
        self.row_group_size = row_group_size
        self.num_images = 0
        self.num_row_groups = 0
        self.skipped: list[SkippedFile] = []
        self.converted: Counter[str] = Counter()
        self._rows: dict[str, list[Any]] = {column: [] for column in SHARD_SCHEMA.names}
        self._writer = pq.ParquetWriter(
            self.temporary_path,
            SHARD_SCHEMA,
            compression=_COMPRESSION,
            use_dictionary=["label"],
            write_statistics=_STATISTICS_COLUMNS,
        )

    def add(self, key: str, image: StoredImage, label: int | None) -> None:
        for column, value in zip(SHARD_SCHEMA.names, (key, image.data, label, image.width, image.height)):
            self._rows[column].append(value)
        self.num_images += 1
        if image.converted_from is not None:
            self.converted[image.converted_from] += 1
        if len(self._rows["key"]) >= self.row_group_size:
            self._write_row_group()

    def skip(self, source: str, error: ImageDecodeError | OSError) -> None:
        self.skipped.append(_skipped(source, error))

    def _write_row_group(self) -> None:
        table = pa.Table.from_pydict(self._rows, schema=SHARD_SCHEMA)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.num_row_groups += 1
        self._rows = {column: [] for column in SHARD_SCHEMA.names}

    def commit(self) -> ShardResult:
        """Finish the file and rename it into place: a shard under its final name is complete."""
        if self._rows["key"]:
            self._write_row_group()
        self._writer.close()
        descriptor = os.open(self.temporary_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the data must be on disk before the name says it is
        finally:
            os.close(descriptor)
        os.replace(self.temporary_path, self.path)
        return ShardResult(
            name=self.name,
            num_images=self.num_images,
            num_row_groups=self.num_row_groups,
            num_bytes=self.path.stat().st_size,
            skipped=self.skipped,
            converted_by_mode=dict(sorted(self.converted.items())),
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.temporary_path.unlink()


def _skipped(source: str, error: ImageDecodeError | OSError) -> SkippedFile:
    if isinstance(error, ImageDecodeError):
        detail = str(error).removeprefix(error.reason).removeprefix(": ")
        return SkippedFile(source, error.reason, detail)
    return SkippedFile(source, "unreadable", error.strerror or str(error))  # reading the file failed


def _add_or_skip(
    writer: _ShardWriter, source: str, key: str, data: bytes, label: int | None, options: ShardOptions
) -> None:
    try:
        image = prepare_image(data, options)
    except ImageDecodeError as error:
        writer.skip(source, error)
        return
    except Exception as error:  # noqa: BLE001 -- one bad image must never stop the run
        writer.skip(source, ImageDecodeError("corrupt", f"{type(error).__name__}: {error}"))
        return
    writer.add(key, image, label)


def _build_file_shard(
    shard: FileShard, output: Path, options: ShardOptions, count_item: Callable[[], None]
) -> ShardResult:
    writer = _ShardWriter(output, shard.name, options.row_group_size)
    try:
        for item in shard.items:
            try:
                data = Path(item.path).read_bytes()
            except OSError as error:
                writer.skip(item.path, error)
            else:
                _add_or_skip(writer, item.path, item.key, data, item.label, options)
            count_item()
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


class _TarSampleReader:
    """A tar's image samples ``(member name, bytes, .cls label)`` in order, one pass.

    Once reading fails, ``next`` returns None and ``error`` says why.
    """

    def __init__(self, tar_path: str):
        self._samples = self._read(tar_path)
        self.error: Exception | None = None

    @staticmethod
    def _read(tar_path: str) -> Iterator[tuple[str, bytes, int | None]]:
        with open(tar_path, "rb") as file:
            for key, sample in iter_samples(file):
                entry = image_entry(sample)
                if entry is not None:
                    extension, data = entry
                    yield f"{key}.{extension}", data, class_label(sample)

    def next(self) -> tuple[str, bytes, int | None] | None:
        if self.error is None:
            try:
                return next(self._samples)
            except StopIteration:
                self.error = EOFError("the tar ended before all its planned samples")
            except (tarfile.TarError, OSError) as error:
                self.error = error
        return None

    def lost_sample(self, tar_path: str, key: str) -> SkippedFile:
        # An OSError that is no TarError comes from opening the file (permissions), not from damage.
        unreadable = isinstance(self.error, OSError) and not isinstance(self.error, tarfile.TarError)
        return SkippedFile(f"{tar_path}::{key}", "unreadable" if unreadable else "truncated", str(self.error))

    def close(self) -> None:
        self._samples.close()


def _build_tar_shards(
    task: TarTask, wanted: frozenset[str], output: Path, options: ShardOptions, count_item: Callable[[], None]
) -> list[ShardResult]:
    """Write the wanted shards of one tar in a single streaming pass.

    The tar was listed when planning, so samples map to shards by position. Should reading fail
    before the planned samples are all read (the tar changed since), the rest are skipped.
    """
    last_wanted = max(index for index, shard in enumerate(task.shards) if shard.name in wanted)
    reader = _TarSampleReader(task.tar_path)
    results = []
    try:
        for shard in task.shards[: last_wanted + 1]:
            if shard.name in wanted:
                results.append(_build_tar_shard(task.tar_path, shard, reader, output, options, count_item))
            else:
                for _ in shard.keys:  # a finished shard: read past its samples
                    reader.next()
    finally:
        reader.close()
    return results


def _build_tar_shard(
    tar_path: str,
    shard: TarShard,
    reader: _TarSampleReader,
    output: Path,
    options: ShardOptions,
    count_item: Callable[[], None],
) -> ShardResult:
    writer = _ShardWriter(output, shard.name, options.row_group_size)
    try:
        for key in shard.keys:
            sample = reader.next()
            if sample is None:
                writer.skipped.append(reader.lost_sample(tar_path, key))
            else:
                member, data, label = sample
                _add_or_skip(writer, f"{tar_path}::{member}", key, data, label, options)
            count_item()
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


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
        options=_options_record(options),
        converted_by_mode=dict(sorted(converted.items())),
        num_ignored=plan.num_ignored,
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
        num_classes=len(manifest.class_names),
        shards_built=shards_built,
        shards_reused=manifest.num_shards - shards_built,
        seconds=round(seconds, 3),
    )
