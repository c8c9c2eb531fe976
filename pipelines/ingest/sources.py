"""Reading planned read units (see ``pipelines.ingest.units``) as raw, undecoded images.

Every failure to hand over an image (a missing file, an unreadable row group, a broken tar) is
counted with a reason in :class:`ReadProblems`; nothing here raises for bad data.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.filesystems import resolve_filesystem
from pipelines.ingest import webdataset
from pipelines.ingest.planning import DataSourceError
from pipelines.ingest.units import Collection, ColumnNames, UnitTable


@dataclass(frozen=True)
class RawImage:
    """One undecoded image as read from a collection. ``label``/``index`` are -1 when unknown."""

    key: str
    data: bytes
    label: int
    index: int
    row: int  # position in its read unit (row group row, tar sample), skipped rows included


@dataclass
class ReadProblems:
    """Images a reader could not even hand over (missing bytes, unreadable files, broken tars)."""

    counts: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        if not self.first_error:
            self.first_error = f"{where}: {reason}"


def read_unit(units: UnitTable, unit: int, columns: ColumnNames, problems: ReadProblems) -> Iterator[RawImage]:
    """Yield the raw images of unit ``unit`` in storage order; anything unreadable goes to ``problems``."""
    if units.kind == "parquet":
        yield from _read_row_group(units, unit, columns, problems)
    elif units.kind == "tar":
        yield from _read_tar(units.path(unit), problems)
    else:
        yield from _read_file(units, unit, problems)


def _image_bytes_column(table: pa.Table, column: str) -> list[bytes | None]:
    values = table.column(column).combine_chunks()
    if pa.types.is_struct(values.type):
        values = values.field("bytes")
    return values.to_pylist()


def _read_row_group(units: UnitTable, unit: int, columns: ColumnNames, problems: ReadProblems) -> Iterator[RawImage]:
    uri, row_group = units.path(unit), int(units.row_group[unit])
    filesystem, path = resolve_filesystem(uri)
    wanted = [name for name in (columns.image, columns.label, columns.key) if name is not None]
    try:
        with filesystem.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read_row_group(row_group, columns=wanted)
    except (OSError, pa.ArrowException) as error:
        problems.add("unreadable_row_group", f"{uri} row group {row_group}: {error}", max(1, int(units.num_rows[unit])))
        return
    images = _image_bytes_column(table, columns.image)  # type: ignore[arg-type]
    labels = table.column(columns.label).to_pylist() if columns.label else [None] * len(images)
    keys = table.column(columns.key).to_pylist() if columns.key else [None] * len(images)
    first = int(units.first_index[unit])
    for row, (data, label, key) in enumerate(zip(images, labels, keys)):
        name = str(key) if key is not None else f"{posixpath.basename(uri)}#{row_group}#{row}"
        if not data:
            problems.add("empty", f"{uri} {name}")
            continue
        yield RawImage(name, data, -1 if label is None else int(label), first + row if first >= 0 else -1, row)


def _read_tar(uri: str, problems: ReadProblems) -> Iterator[RawImage]:
    filesystem, path = resolve_filesystem(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            for row, (key, sample) in enumerate(webdataset.iter_samples(stream)):
                entry = webdataset.image_entry(sample)
                if entry is None:
                    problems.add("no_image_entry", f"{uri} {key}")
                    continue
                label = webdataset.class_label(sample)
                yield RawImage(key, entry[1], -1 if label is None else label, -1, row)
    except Exception as error:  # noqa: BLE001 -- tarfile and the filesystems raise many kinds
        problems.add("broken_tar", f"{uri}: {type(error).__name__}: {error}")


def _read_file(units: UnitTable, unit: int, problems: ReadProblems) -> Iterator[RawImage]:
    uri = units.path(unit)
    filesystem, path = resolve_filesystem(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except (OSError, pa.ArrowException) as error:
        problems.add("unreadable", f"{uri}: {error}")
        return
    yield RawImage(uri, data, int(units.label[unit]), int(units.first_index[unit]), 0)


def check_decodable(collection: Collection, sample_size: int = 32) -> None:
    """Fail fast when a collection's images cannot be decoded at all (a wrong column, say).

    Reads the first units until ``sample_size`` images and decodes them; one success is enough.

    Raises:
        DataSourceError: none decodes; the message names the file, the column and the reasons.
    """
    from moco_core.image_io import ImageDecodeError, decode_rgb, open_image

    reasons: dict[str, int] = {}
    problems = ReadProblems()
    tried, where = 0, ""
    for unit in range(len(collection.units)):
        where = collection.units.path(unit)
        for image in read_unit(collection.units, unit, collection.columns, problems):
            try:
                decode_rgb(open_image(image.data))
                return
            except ImageDecodeError as error:
                reasons[error.reason] = reasons.get(error.reason, 0) + 1
            tried += 1
            if tried >= sample_size:
                break
        if tried >= sample_size:
            break
    for reason, count in problems.counts.items():
        reasons[reason] = reasons.get(reason, 0) + count
    column = f", column {collection.columns.image!r}" if collection.columns.image else ""
    summary = ", ".join(f"{reason} x{count}" for reason, count in sorted(reasons.items())) or "no images read"
    raise DataSourceError(f"{where}{column}: none of the first {max(tried, 1)} images decode ({summary})")
