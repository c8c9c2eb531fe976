"""Image collections in the layouts our users have, read as one stream of raw images.

Accepted layouts (``layout="auto"`` tells them apart):

* ``moco`` -- a directory written by ``moco shard`` (``_manifest.json`` + Parquet shards);
* ``parquet`` -- any Parquet files with an image column: img2dataset's (``jpg`` binary, ``key``),
  Hugging Face's (``image`` struct with ``bytes``, plus ``label``), or our own without a manifest;
* ``webdataset`` -- ``.tar`` files of samples (``jpg``/``png``/``webp`` entries, optional ``.cls``);
* ``folder`` -- a plain image folder; class subfolders give labels, a flat folder none.

A collection is planned into :class:`ReadUnit` s (a Parquet row group, a whole tar, or a chunk
of image files): the units are what gets shuffled per epoch and read in parallel. Paths may be
local paths, globs, or URIs that pyarrow's filesystems open (``s3://``, ``gs://``).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.ingest import webdataset
from pipelines.ingest.schema import MANIFEST_NAME, Manifest
from pipelines.ingest.webdataset import is_image_file_name

Layout = Literal["auto", "moco", "parquet", "webdataset", "folder"]
LAYOUTS: tuple[str, ...] = ("auto", "moco", "parquet", "webdataset", "folder")
#: Column names tried, in order, when none is given.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "jpg", "jpeg", "png", "webp", "img")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "cls", "labels")
KEY_COLUMN_CANDIDATES: tuple[str, ...] = ("key", "id", "__key__")
FILES_PER_UNIT = 256


class DataSourceError(ValueError):
    """A collection that cannot be read as configured; the message names the file and column."""


@dataclass(frozen=True)
class ColumnNames:
    """Parquet column names; ``None`` means detect (see the ``*_CANDIDATES`` tuples)."""

    image: str | None = None
    label: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ReadUnit:
    """The smallest piece of a collection one task reads.

    Attributes:
        kind: ``parquet`` (one row group), ``tar`` (one WebDataset tar) or ``files``.
        uri: the Parquet or tar file; empty for ``files``.
        row_group: the row group of a Parquet unit.
        files: (uri, label) pairs of a ``files`` unit (label -1: none).
        first_index: dataset index of the unit's first image, when known (memory bank needs it).
        num_rows: images in the unit, when known.
    """

    kind: Literal["parquet", "tar", "files"]
    uri: str = ""
    row_group: int = 0
    files: tuple[tuple[str, int], ...] = ()
    first_index: int | None = None
    num_rows: int | None = None


@dataclass(frozen=True)
class RawImage:
    """One undecoded image as read from a collection. ``label``/``index`` are -1 when unknown."""

    key: str
    data: bytes
    label: int
    index: int


@dataclass(frozen=True)
class Collection:
    """A planned collection: its units in a fixed order plus what is known about it."""

    layout: str
    units: tuple[ReadUnit, ...]
    columns: ColumnNames = ColumnNames()
    class_names: tuple[str, ...] = ()
    num_images: int | None = None  # None when unknown without reading everything (tars)
    sources: tuple[str, ...] = field(default=())

    @property
    def indexed(self) -> bool:
        """Whether every image has a stable dataset index (needed by the memory bank)."""
        return all(unit.first_index is not None for unit in self.units)


# ----------------------------------------------------------------------------- filesystems


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI pyarrow understands (s3://, gs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise DataSourceError(f"cannot open {uri}: {error}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _join(uri: str, relative: str) -> str:
    return posixpath.join(uri.rstrip("/"), relative) if "://" in uri else os.path.join(uri, relative)


def _uri_for(original: str, filesystem: pafs.FileSystem, path: str) -> str:
    """A URI for ``path`` on the same filesystem as ``original``."""
    if "://" not in original:
        return path
    scheme = original.split("://", 1)[0]
    return f"{scheme}://{path}"


def _file_type(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


def _list_files(filesystem: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, recursive=recursive)
    return sorted(
        (info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File),
        key=lambda info: info.path,
    )


def expand_paths(patterns: Sequence[str]) -> list[tuple[str, pafs.FileSystem, str]]:
    """Expand globs; return (original-style uri, filesystem, path) for every match, sorted.

    Raises:
        DataSourceError: a path or pattern matches nothing.
    """
    expanded = []
    for pattern in patterns:
        filesystem, path = resolve_filesystem(pattern)
        if any(char in path for char in "*?["):
            base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] or "/"
            matches = [
                info.path for info in _list_files(filesystem, base, recursive=True) if fnmatch.fnmatch(info.path, path)
            ]
            if not matches:
                raise DataSourceError(f"no files match {pattern}")
            expanded.extend((_uri_for(pattern, filesystem, match), filesystem, match) for match in matches)
        elif _file_type(filesystem, path) == pafs.FileType.NotFound:
            raise DataSourceError(f"{pattern} does not exist")
        else:
            expanded.append((pattern if "://" in pattern else path, filesystem, path))
    return expanded


# ----------------------------------------------------------------------------- planning


def plan_collection(
    sources: str | Sequence[str], layout: Layout = "auto", columns: ColumnNames = ColumnNames()
) -> Collection:
    """Plan a collection from one or more paths/URIs/globs of the same layout.

    Parquet footers are read (in parallel) to find row groups and to check the image column, so
    a wrong schema fails here with a message naming the file and the column.

    Raises:
        DataSourceError: nothing found, mixed layouts, or a wrong schema.
    """
    if isinstance(sources, str):
        sources = [sources]
    if layout not in LAYOUTS:
        raise DataSourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    entries = expand_paths(sources)
    detected = layout if layout != "auto" else _detect_layout(entries)
    if detected == "moco":
        collection = _plan_moco(entries)
    elif detected == "parquet":
        collection = _plan_parquet(
            [uri for entry in entries for uri in _files_with_suffix(entry, (".parquet",))], columns
        )
    elif detected == "webdataset":
        collection = _plan_tars([uri for entry in entries for uri in _files_with_suffix(entry, (".tar",))])
    else:
        collection = _plan_folders(entries)
    if not collection.units:
        raise DataSourceError(f"no images found in {', '.join(sources)} (layout {detected})")
    return replace(collection, sources=tuple(sources))


def _detect_layout(entries: list[tuple[str, pafs.FileSystem, str]]) -> str:
    kinds = set()
    for _, filesystem, path in entries:
        if _file_type(filesystem, path) == pafs.FileType.File:
            kinds.add("parquet" if path.endswith(".parquet") else "webdataset" if path.endswith(".tar") else "?")
            continue
        if _file_type(filesystem, posixpath.join(path, MANIFEST_NAME)) == pafs.FileType.File:
            kinds.add("moco")
            continue
        names = [info.path for info in _list_files(filesystem, path, recursive=True)]
        if any(name.endswith(".parquet") for name in names):
            kinds.add("parquet")
        elif any(name.endswith(".tar") for name in names):
            kinds.add("webdataset")
        else:
            kinds.add("folder")
    if "?" in kinds:
        raise DataSourceError("cannot tell the layout of a file that is not .parquet or .tar; pass --layout")
    if len(kinds) != 1:
        raise DataSourceError(f"sources mix layouts ({', '.join(sorted(kinds))}); give one layout at a time")
    return kinds.pop()


def _files_with_suffix(entry: tuple[str, pafs.FileSystem, str], suffixes: tuple[str, ...]) -> list[str]:
    uri, filesystem, path = entry
    if _file_type(filesystem, path) == pafs.FileType.File:
        return [uri]
    return [
        _uri_for(uri, filesystem, info.path)
        for info in _list_files(filesystem, path, recursive=True)
        if info.path.endswith(suffixes)
    ]


def _plan_moco(entries: list[tuple[str, pafs.FileSystem, str]]) -> Collection:
    units: list[ReadUnit] = []
    class_names: tuple[str, ...] = ()
    total = 0
    for uri, filesystem, path in entries:
        with filesystem.open_input_stream(posixpath.join(path, MANIFEST_NAME)) as stream:
            manifest = Manifest.from_json(stream.read().decode("utf-8"))
        if class_names and manifest.class_names and tuple(manifest.class_names) != class_names:
            raise DataSourceError(f"{uri}: its class names differ from the other shard directories'")
        class_names = class_names or tuple(manifest.class_names)
        parquet_uris = [_join(uri, shard["path"]) for shard in manifest.shards]
        planned = _plan_parquet(parquet_uris, ColumnNames("image", "label", "key"), first_index=total)
        units.extend(planned.units)
        total += planned.num_images or 0
    return Collection("moco", tuple(units), ColumnNames("image", "label", "key"), class_names, total)


def _pick_column(
    schema: pa.Schema, requested: str | None, candidates: tuple[str, ...], uri: str, role: str, required: bool
) -> str | None:
    names = schema.names
    if requested is not None:
        if requested not in names:
            raise DataSourceError(f"{uri}: no {role} column {requested!r} (columns: {', '.join(names)})")
        return requested
    for candidate in candidates:
        if candidate in names:
            return candidate
    if required:
        raise DataSourceError(
            f"{uri}: no {role} column among {', '.join(candidates)} (columns: {', '.join(names)}); "
            f"name it with --{role}-column"
        )
    return None


def _check_image_type(schema: pa.Schema, column: str, uri: str) -> None:
    column_type = schema.field(column).type
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        return
    raise DataSourceError(
        f"{uri}: image column {column!r} has type {column_type}; expected binary image bytes "
        "or a struct with a 'bytes' field (Hugging Face Image)"
    )


def _check_label_type(schema: pa.Schema, column: str | None, uri: str) -> str | None:
    if column is None:
        return None
    if not pa.types.is_integer(schema.field(column).type):
        raise DataSourceError(f"{uri}: label column {column!r} has type {schema.field(column).type}; expected integers")
    return column


def _plan_parquet(uris: list[str], columns: ColumnNames, first_index: int = 0) -> Collection:
    if not uris:
        return Collection("parquet", ())

    def footer(uri: str) -> pq.FileMetaData:
        filesystem, path = resolve_filesystem(uri)
        try:
            with filesystem.open_input_file(path) as handle:
                return pq.ParquetFile(handle).metadata
        except (OSError, pa.ArrowException) as error:
            raise DataSourceError(f"{uri}: not a readable Parquet file ({error})") from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(footer, uris))
    first_schema = footers[0].schema.to_arrow_schema()
    image = _pick_column(first_schema, columns.image, IMAGE_COLUMN_CANDIDATES, uris[0], "image", required=True)
    label = _pick_column(first_schema, columns.label, LABEL_COLUMN_CANDIDATES, uris[0], "label", required=False)
    key = _pick_column(first_schema, columns.key, KEY_COLUMN_CANDIDATES, uris[0], "key", required=False)
    resolved = ColumnNames(image, label, key)
    units, index = [], first_index
    for uri, metadata in zip(uris, footers):
        schema = metadata.schema.to_arrow_schema()
        for role, name in (("image", image), ("label", label), ("key", key)):
            if name is not None and name not in schema.names:
                raise DataSourceError(f"{uri}: no {role} column {name!r} (columns: {', '.join(schema.names)})")
        _check_image_type(schema, image, uri)  # type: ignore[arg-type]
        _check_label_type(schema, label, uri)
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            if rows:
                units.append(ReadUnit("parquet", uri, row_group, first_index=index, num_rows=rows))
            index += rows
    return Collection("parquet", tuple(units), resolved, (), index - first_index)


def _plan_tars(uris: list[str]) -> Collection:
    return Collection("webdataset", tuple(ReadUnit("tar", uri) for uri in uris), ColumnNames(), (), None)


def _plan_folders(entries: list[tuple[str, pafs.FileSystem, str]]) -> Collection:
    """As ``moco shard`` reads folders: subfolders are classes (sorted names), images directly in
    the top folder stay unlabeled, hidden files and folders are not images."""
    listed: list[tuple[str, str]] = []  # (uri, relative path)
    for uri, filesystem, path in entries:
        if _file_type(filesystem, path) == pafs.FileType.File:
            listed.append((uri, posixpath.basename(path)))
            continue
        for info in _list_files(filesystem, path, recursive=True):
            relative = posixpath.relpath(info.path, path)
            hidden = any(part.startswith(".") for part in relative.split("/"))
            if is_image_file_name(posixpath.basename(relative)) and not hidden:
                listed.append((_uri_for(uri, filesystem, info.path), relative))
    class_names = tuple(sorted({relative.split("/", 1)[0] for _, relative in listed if "/" in relative}))
    class_index = {name: index for index, name in enumerate(class_names)}
    files = tuple((uri, class_index[relative.split("/", 1)[0]] if "/" in relative else -1) for uri, relative in listed)
    units = tuple(
        ReadUnit(
            "files",
            files=files[start : start + FILES_PER_UNIT],
            first_index=start,
            num_rows=len(files[start : start + FILES_PER_UNIT]),
        )
        for start in range(0, len(files), FILES_PER_UNIT)
    )
    return Collection("folder", units, ColumnNames(), class_names, len(files))


# ----------------------------------------------------------------------------- reading


@dataclass
class ReadProblems:
    """Images a reader could not even hand over (missing bytes, unreadable files, broken tars)."""

    counts: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        if not self.first_error:
            self.first_error = f"{where}: {reason}"


def read_unit(unit: ReadUnit, columns: ColumnNames, problems: ReadProblems) -> Iterator[RawImage]:
    """Yield the raw images of ``unit`` in storage order; anything unreadable goes to ``problems``."""
    if unit.kind == "parquet":
        yield from _read_row_group(unit, columns, problems)
    elif unit.kind == "tar":
        yield from _read_tar(unit, problems)
    else:
        yield from _read_files(unit, problems)


def _image_bytes_column(table: pa.Table, column: str) -> list[bytes | None]:
    values = table.column(column).combine_chunks()
    if pa.types.is_struct(values.type):
        values = values.field("bytes")
    return values.to_pylist()


def _read_row_group(unit: ReadUnit, columns: ColumnNames, problems: ReadProblems) -> Iterator[RawImage]:
    filesystem, path = resolve_filesystem(unit.uri)
    wanted = [name for name in (columns.image, columns.label, columns.key) if name is not None]
    try:
        with filesystem.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read_row_group(unit.row_group, columns=wanted)
    except (OSError, pa.ArrowException) as error:
        problems.add("unreadable_row_group", f"{unit.uri} row group {unit.row_group}: {error}", unit.num_rows or 1)
        return
    images = _image_bytes_column(table, columns.image)  # type: ignore[arg-type]
    labels = table.column(columns.label).to_pylist() if columns.label else [None] * len(images)
    keys = table.column(columns.key).to_pylist() if columns.key else [None] * len(images)
    first = unit.first_index if unit.first_index is not None else -1
    for row, (data, label, key) in enumerate(zip(images, labels, keys)):
        name = str(key) if key is not None else f"{posixpath.basename(unit.uri)}#{unit.row_group}#{row}"
        if not data:
            problems.add("empty", f"{unit.uri} {name}")
            continue
        yield RawImage(name, data, -1 if label is None else int(label), first + row if first >= 0 else -1)


def _read_tar(unit: ReadUnit, problems: ReadProblems) -> Iterator[RawImage]:
    filesystem, path = resolve_filesystem(unit.uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            for key, sample in webdataset.iter_samples(stream):
                entry = webdataset.image_entry(sample)
                if entry is None:
                    problems.add("no_image_entry", f"{unit.uri} {key}")
                    continue
                label = webdataset.class_label(sample)
                yield RawImage(key, entry[1], -1 if label is None else label, -1)
    except Exception as error:  # noqa: BLE001 -- tarfile and the filesystems raise many kinds
        problems.add("broken_tar", f"{unit.uri}: {type(error).__name__}: {error}")


def _read_files(unit: ReadUnit, problems: ReadProblems) -> Iterator[RawImage]:
    first = unit.first_index if unit.first_index is not None else -1
    for offset, (uri, label) in enumerate(unit.files):
        filesystem, path = resolve_filesystem(uri)
        try:
            with filesystem.open_input_stream(path) as stream:
                data = stream.read()
        except (OSError, pa.ArrowException) as error:
            problems.add("unreadable", f"{uri}: {error}")
            continue
        yield RawImage(uri, data, label, first + offset if first >= 0 else -1)


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
    for unit in collection.units:
        where = unit.uri or (unit.files[0][0] if unit.files else "")
        for image in read_unit(unit, collection.columns, problems):
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
