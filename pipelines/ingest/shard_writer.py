"""Write one ``moco shard`` task: validate (and maybe downscale) each image, write its Parquet shards.

Runs in a worker process, or in the calling one when there is one worker. Each shard is written
under a temporary name and renamed into place only once complete, so a file under a shard's final
name is always a whole shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from moco_core.image_io import ImageDecodeError, decode_rgb, open_image
from pipelines.ingest.schema import SHARD_SCHEMA, SkippedFile
from pipelines.ingest.shard_plan import FileShard, ShardOptions, ShardTask, TarShard, TarTask
from pipelines.ingest.webdataset import class_label, image_entry, iter_samples

# Shards are written as ``NAME.tmp-PID``: a process orphaned by a killed run never shares its
# half-written file with a rerun.
TEMPORARY_MARKER = ".tmp"
EXIF_ORIENTATION = 0x0112

# Image bytes are already compressed: compressing them again costs CPU for nothing.
_COMPRESSION = {"key": "snappy", "image": "none", "label": "snappy", "width": "snappy", "height": "snappy"}
# Min/max statistics of the image column would copy image bytes into the footer.
_STATISTICS_COLUMNS = ["key", "label", "width", "height"]


def temporary_path(path: Path) -> Path:
    """The name ``path`` is written under until it is complete and renamed into place."""
    return path.with_name(f"{path.name}{TEMPORARY_MARKER}-{os.getpid()}")


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
    """Collects the rows of one shard, writes a row group whenever one is full, and counts.

    Used as a context manager: leaving it by an exception (Ctrl-C included) removes the
    half-written file.
    """

    def __init__(self, output: Path, name: str, row_group_size: int):
        self.name = name
        self.path = output / name
        self.temporary_path = temporary_path(self.path)
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

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()


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
    with _ShardWriter(output, shard.name, options.row_group_size) as writer:
        for item in shard.items:
            try:
                data = Path(item.path).read_bytes()
            except OSError as error:
                writer.skip(item.path, error)
            else:
                _add_or_skip(writer, item.path, item.key, data, item.label, options)
            count_item()
        return writer.commit()


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
    with _ShardWriter(output, shard.name, options.row_group_size) as writer:
        for key in shard.keys:
            sample = reader.next()
            if sample is None:
                writer.skipped.append(reader.lost_sample(tar_path, key))
            else:
                member, data, label = sample
                _add_or_skip(writer, f"{tar_path}::{member}", key, data, label, options)
            count_item()
        return writer.commit()


def build_task(
    task: ShardTask, wanted: frozenset[str], output: Path, options: ShardOptions, count_item: Callable[[], None]
) -> list[ShardResult]:
    """Write the ``wanted`` shards of ``task`` into ``output``; ``count_item`` is called per image."""
    if isinstance(task, FileShard):
        return [_build_file_shard(task, output, options, count_item)]
    return _build_tar_shards(task, wanted, output, options, count_item)
