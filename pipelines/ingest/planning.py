"""Plan an image collection into read units, in the layouts our users have.

Accepted layouts (``layout="auto"`` tells them apart):

* ``moco`` -- a directory written by ``moco shard``: planned from ``_manifest.json`` alone (row
  group sizes are known at shard time), without opening a single Parquet file;
* ``parquet`` -- any Parquet files with an image column: img2dataset's (``jpg`` binary, ``key``),
  Hugging Face's (``image`` struct with ``bytes``, plus ``label``), or ours without a manifest.
  Footers are read in parallel: threads for a few files, Ray tasks over the cluster for many;
* ``webdataset`` -- ``.tar`` files of samples (``jpg``/``png``/``webp`` entries, optional ``.cls``);
* ``folder`` -- a plain image folder; class subfolders give labels, a flat folder none. Every file
  is its own unit, so a folder is shuffled globally each epoch.

Paths may be local paths, globs, or URIs that pyarrow's filesystems open (``s3://``, ``gs://``).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.console import note
from pipelines.filesystems import join, resolve_filesystem, uri_for
from pipelines.ingest.schema import MANIFEST_NAME, ManifestError, read_manifest
from pipelines.ingest.units import Collection, ColumnNames, UnitTable, unit_table
from pipelines.ingest.webdataset import is_image_file_name

Layout = Literal["auto", "moco", "parquet", "webdataset", "folder"]
LAYOUTS: tuple[str, ...] = ("auto", "moco", "parquet", "webdataset", "folder")
#: Column names tried, in order, when none is given.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "jpg", "jpeg", "png", "webp", "img")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "cls", "labels")
KEY_COLUMN_CANDIDATES: tuple[str, ...] = ("key", "id", "__key__")
#: Above this many Parquet files, footers are read by Ray tasks (when Ray is running).
FOOTERS_ON_DRIVER = 256
#: Parquet files per footer-reading Ray task.
FOOTERS_PER_TASK = 512


class DataSourceError(ValueError):
    """A collection that cannot be read as configured; the message names the file and column."""


FanOut = Callable[[Callable[[list[str]], Any], list[list[str]]], Iterable[Any]]


def plan_collection(
    sources: str | Sequence[str],
    layout: Layout = "auto",
    columns: ColumnNames | None = None,
    fan_out: FanOut | None = None,
) -> Collection:
    """Plan a collection from one or more paths/URIs/globs of the same layout.

    Args:
        sources: paths, globs or URIs.
        layout: one of :data:`LAYOUTS`.
        columns: Parquet column names (None: detect).
        fan_out: ``fan_out(function, chunks)`` maps ``function`` over chunks of Parquet files in
            parallel (default: Ray tasks when Ray is running and there are many files, else
            threads on this process).

    Raises:
        DataSourceError: nothing found, mixed layouts, or a wrong schema (naming the file and column).
    """
    if isinstance(sources, str):
        sources = [sources]
    columns = columns or ColumnNames()
    if layout not in LAYOUTS:
        raise DataSourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    entries = expand_paths(sources)
    detected = layout if layout != "auto" else _detect_layout(entries)
    if detected == "moco":
        collection = _plan_moco(entries)
    elif detected == "parquet":
        uris = [uri for entry in entries for uri in _files_with_suffix(entry, (".parquet",))]
        collection = _plan_parquet(uris, columns, fan_out)
    elif detected == "webdataset":
        uris = [uri for entry in entries for uri in _files_with_suffix(entry, (".tar",))]
        collection = Collection("webdataset", unit_table("tar", uris, np.arange(len(uris))))
    else:
        collection = _plan_folders(entries)
    if not len(collection.units):
        raise DataSourceError(f"no images found in {', '.join(sources)} (layout {detected})")
    return replace(collection, sources=tuple(sources))


# ----------------------------------------------------------------------------- listing


def _list_files(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """Every file below the folder ``path``, sorted. On a local disk, as ``moco shard`` lists
    folders: a folder reached twice (a symlink loop, a folder linked twice) is listed once, and one
    that cannot be listed is skipped with a warning."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(info.path for info in listed if info.type == pafs.FileType.File)
    files: list[str] = []
    unreadable: list[OSError] = []
    visited: set[str] = set()

    def skip(error: OSError) -> None:
        if not isinstance(error, FileNotFoundError):  # gone meanwhile, or a glob's missing base: nothing to say
            unreadable.append(error)

    for directory, subdirectories, names in os.walk(path, onerror=skip, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            subdirectories.clear()
            continue
        visited.add(real)
        files.extend(os.path.join(directory, name) for name in names)
    if unreadable:
        first = unreadable[0]
        note(
            f"warning: skipped {len(unreadable)} folder(s) that cannot be listed, "
            f"e.g. {first.filename}: {first.strerror or first}"
        )
    return sorted(files)


def _file_type(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


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
            matches = [match for match in _list_files(filesystem, base) if fnmatch.fnmatch(match, path)]
            if not matches:
                raise DataSourceError(f"no files match {pattern}")
            expanded.extend((uri_for(pattern, match), filesystem, match) for match in matches)
        elif _file_type(filesystem, path) == pafs.FileType.NotFound:
            raise DataSourceError(f"{pattern} does not exist")
        else:
            expanded.append((pattern if "://" in pattern else path, filesystem, path))
    return expanded


def _detect_layout(entries: list[tuple[str, pafs.FileSystem, str]]) -> str:
    kinds = set()
    for _, filesystem, path in entries:
        if _file_type(filesystem, path) == pafs.FileType.File:
            kinds.add("parquet" if path.endswith(".parquet") else "webdataset" if path.endswith(".tar") else "?")
            continue
        if _file_type(filesystem, posixpath.join(path, MANIFEST_NAME)) == pafs.FileType.File:
            kinds.add("moco")
            continue
        names = _list_files(filesystem, path)
        if any(name.endswith(".parquet") for name in names):
            kinds.add("parquet")
        elif any(name.endswith(".tar") for name in names):
            kinds.add("webdataset")
        else:
            kinds.add("folder")
    if "?" in kinds:
        raise DataSourceError(
            "cannot tell the layout of a file that is not .parquet or .tar; name it with --set data.layout=..."
        )
    if len(kinds) != 1:
        raise DataSourceError(f"sources mix layouts ({', '.join(sorted(kinds))}); give one layout at a time")
    return kinds.pop()


def _files_with_suffix(entry: tuple[str, pafs.FileSystem, str], suffixes: tuple[str, ...]) -> list[str]:
    uri, filesystem, path = entry
    if _file_type(filesystem, path) == pafs.FileType.File:
        return [uri]
    return [uri_for(uri, name) for name in _list_files(filesystem, path) if name.endswith(suffixes)]


# ----------------------------------------------------------------------------- moco shards


def _manifest_units(base: str, shards: list[dict], row_group_size: int, first_index: int) -> UnitTable:
    """Units of one shard directory from its manifest, vectorised over shards: ``moco shard``
    writes full row groups of ``row_group_size``, then the remainder. A shard whose counts do not
    follow that rule (an older manifest without options) has its footer read instead."""
    paths = [join(base, shard["path"]) for shard in shards]
    images = np.array([shard["num_images"] for shard in shards], dtype=np.int64)
    groups = np.array([shard["num_row_groups"] for shard in shards], dtype=np.int64)
    if row_group_size:
        full, remainder = images // row_group_size, images % row_group_size
        regular = full + (remainder > 0) == groups
    else:
        regular = np.zeros(len(shards), dtype=bool)
    if regular.all():
        ends = np.cumsum(groups)
        num_rows = np.full(int(ends[-1]) if len(ends) else 0, row_group_size, dtype=np.int64)
        num_rows[ends[remainder > 0] - 1] = remainder[remainder > 0]
        return _units_from_sizes(paths, groups, num_rows, first_index)
    sizes_per_file = [
        [row_group_size] * int(full[i]) + ([int(remainder[i])] if remainder[i] else [])
        if regular[i]
        else _footer_row_group_sizes(paths[i])
        for i in range(len(shards))
    ]
    return _parquet_units(paths, sizes_per_file, first_index)


def _plan_moco(entries: list[tuple[str, pafs.FileSystem, str]]) -> Collection:
    """Units from the manifests alone (no shard is opened for what ``moco shard`` wrote)."""
    tables: list[UnitTable] = []
    class_names: tuple[str, ...] = ()
    total = 0
    for uri, filesystem, path in entries:
        with filesystem.open_input_stream(posixpath.join(path, MANIFEST_NAME)) as stream:
            text = stream.read().decode("utf-8", errors="replace")
        try:
            manifest = read_manifest(uri_for(uri, posixpath.join(path, MANIFEST_NAME)), text)
        except ManifestError as error:
            raise DataSourceError(str(error)) from None
        names = tuple(manifest.class_names)
        if class_names and names and names != class_names:
            raise DataSourceError(f"{uri}: its class names differ from the other shard directories'")
        class_names = class_names or names
        row_group_size = manifest.options.get("row_group_size", 0)
        table = _manifest_units(uri, manifest.shards, row_group_size, first_index=total)
        tables.append(table)
        total += int(table.num_rows.sum())
    columns = ColumnNames("image", "label", "key")
    return Collection("moco", UnitTable.concatenate(tables), columns, class_names, total)


def _parquet_units(paths: list[str], sizes_per_file: list[list[int]], first_index: int = 0) -> UnitTable:
    """One unit per non-empty row group; dataset indices count every row in file order."""
    counts = np.array([len(sizes) for sizes in sizes_per_file], dtype=np.int64)
    num_rows = np.fromiter((rows for sizes in sizes_per_file for rows in sizes), dtype=np.int64, count=counts.sum())
    return _units_from_sizes(paths, counts, num_rows, first_index)


def _units_from_sizes(paths: list[str], groups: np.ndarray, num_rows: np.ndarray, first_index: int) -> UnitTable:
    """Units from the row-group count of each file and every row group's rows, in file order."""
    path_index = np.repeat(np.arange(len(paths)), groups)
    starts = np.repeat(np.cumsum(groups) - groups, groups)
    row_group = np.arange(len(num_rows)) - starts
    first = first_index + np.cumsum(num_rows) - num_rows
    keep = num_rows > 0
    return unit_table("parquet", paths, path_index[keep], row_group[keep], num_rows[keep], first[keep])


# ----------------------------------------------------------------------------- foreign Parquet


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
            f"name it with --{role}-column (moco pretrain) or --set data.{role}_column=NAME "
            "(--probe-set for the probe data of moco tune momentum and mechanism)"
        )
    return None


def _schema_problem(schema: pa.Schema, columns: ColumnNames, uri: str) -> str | None:
    """What is wrong with ``uri``'s schema for ``columns``, or None."""
    for role, name in (("image", columns.image), ("label", columns.label), ("key", columns.key)):
        if name is not None and name not in schema.names:
            return f"{uri}: no {role} column {name!r} (columns: {', '.join(schema.names)})"
    image_type = schema.field(columns.image).type
    binary = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if not binary and not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
        return (
            f"{uri}: image column {columns.image!r} has type {image_type}; expected binary image bytes "
            "or a struct with a 'bytes' field (Hugging Face Image)"
        )
    if columns.label is not None and not pa.types.is_integer(schema.field(columns.label).type):
        return f"{uri}: label column {columns.label!r} has type {schema.field(columns.label).type}; expected integers"
    return None


def _read_footer(uri: str) -> pq.FileMetaData:
    filesystem, path = resolve_filesystem(uri)
    try:
        with filesystem.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata
    except (OSError, pa.ArrowException) as error:
        raise DataSourceError(f"{uri}: not a readable Parquet file ({error})") from None


def _footer_row_group_sizes(uri: str) -> list[int]:
    metadata = _read_footer(uri)
    return [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]


@dataclass(frozen=True)
class _FooterCheck:
    """Reads the footers of a chunk of files: their row group sizes, or the first schema problem."""

    columns: ColumnNames

    def __call__(self, uris: list[str]) -> tuple[list[list[int]], str | None]:
        def one(uri: str) -> tuple[list[int], str | None]:
            metadata = _read_footer(uri)
            problem = _schema_problem(metadata.schema.to_arrow_schema(), self.columns, uri)
            return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], problem

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, uris))
        problems = [problem for _, problem in results if problem]
        return [sizes for sizes, _ in results], problems[0] if problems else None


def _ray_fan_out(function: Callable[[list[str]], Any], chunks: list[list[str]]) -> Iterable[Any]:
    import ray

    remote = ray.remote(num_cpus=1)(lambda chunk: function(chunk))
    return ray.get([remote.remote(chunk) for chunk in chunks])


def _thread_fan_out(function: Callable[[list[str]], Any], chunks: list[list[str]]) -> Iterable[Any]:
    return map(function, chunks)


def _default_fan_out(num_files: int) -> FanOut:
    if num_files > FOOTERS_ON_DRIVER:
        import ray

        if ray.is_initialized():
            return _ray_fan_out
    return _thread_fan_out


def _plan_parquet(uris: list[str], columns: ColumnNames, fan_out: FanOut | None) -> Collection:
    if not uris:
        return Collection("parquet", unit_table("parquet", [], np.zeros(0)))
    first_schema = _read_footer(uris[0]).schema.to_arrow_schema()
    image = _pick_column(first_schema, columns.image, IMAGE_COLUMN_CANDIDATES, uris[0], "image", required=True)
    label = _pick_column(first_schema, columns.label, LABEL_COLUMN_CANDIDATES, uris[0], "label", required=False)
    key = _pick_column(first_schema, columns.key, KEY_COLUMN_CANDIDATES, uris[0], "key", required=False)
    resolved = ColumnNames(image, label, key)
    chunks = [uris[start : start + FOOTERS_PER_TASK] for start in range(0, len(uris), FOOTERS_PER_TASK)]
    sizes_per_file: list[list[int]] = []
    for sizes, problem in (fan_out or _default_fan_out(len(uris)))(_FooterCheck(resolved), chunks):
        if problem:
            raise DataSourceError(problem)
        sizes_per_file.extend(sizes)
    table = _parquet_units(uris, sizes_per_file)
    return Collection("parquet", table, resolved, (), int(table.num_rows.sum()))


# ----------------------------------------------------------------------------- folders


def _plan_folders(entries: list[tuple[str, pafs.FileSystem, str]]) -> Collection:
    """As ``moco shard`` reads folders: subfolders are classes (sorted names), images directly in
    the top folder stay unlabeled, hidden files and folders are not images. One unit per file."""
    listed: list[tuple[str, str]] = []  # (uri, relative path)
    for uri, filesystem, path in entries:
        if _file_type(filesystem, path) == pafs.FileType.File:
            listed.append((uri, posixpath.basename(path)))
            continue
        for name in _list_files(filesystem, path):
            relative = posixpath.relpath(name, path)
            hidden = any(part.startswith(".") for part in relative.split("/"))
            if is_image_file_name(posixpath.basename(relative)) and not hidden:
                listed.append((uri_for(uri, name), relative))
    class_names = tuple(sorted({relative.split("/", 1)[0] for _, relative in listed if "/" in relative}))
    class_index = {name: index for index, name in enumerate(class_names)}
    labels = [class_index[relative.split("/", 1)[0]] if "/" in relative else -1 for _, relative in listed]
    count = len(listed)
    table = unit_table(
        "files",
        [uri for uri, _ in listed],
        np.arange(count),
        num_rows=np.ones(count),
        first_index=np.arange(count),
        label=np.array(labels, dtype=np.int64),
    )
    return Collection("folder", table, ColumnNames(), class_names, count)
