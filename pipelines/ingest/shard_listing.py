"""List the images of each ``moco shard`` source: image folders, path lists and WebDataset tars.

Listing reads names only (folder entries, list lines, tar headers), never image bytes; what it
cannot read is recorded as skipped rather than stopping the run.
"""

from __future__ import annotations

import codecs
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.ingest.schema import SkippedFile
from pipelines.ingest.webdataset import IMAGE_EXTENSIONS, is_image_file_name, split_member_name

_INTEGER_LABEL = re.compile(r"[+-]?\d+")


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
class SourceListing:
    """Items of one source before keys are made unique and labels resolved."""

    files: list[tuple[str, str, int | str | None]] = field(default_factory=list)  # path, key, label
    tar_keys: list[str] = field(default_factory=list)
    class_names: set[str] = field(default_factory=set)
    skipped: list[SkippedFile] = field(default_factory=list)
    num_ignored: int = 0  # files and tar samples without an image extension
    ignored_examples: list[str] = field(default_factory=list)
    num_hidden: int = 0  # hidden files (``.DS_Store``, macOS ``._x.jpg`` resource forks)
    hidden_examples: list[str] = field(default_factory=list)

    def ignore(self, name: str) -> None:
        self.num_ignored += 1
        if len(self.ignored_examples) < 5:
            self.ignored_examples.append(name)

    def hide(self, name: str) -> None:
        self.num_hidden += 1
        if len(self.hidden_examples) < 5:
            self.hidden_examples.append(name)


def list_sources(
    sources: list[tuple[str, Path]], exclude: Path | None, parallel_map: Callable[..., Iterable[Any]]
) -> list[SourceListing]:
    """One listing per source, in source order; tars are listed through ``parallel_map``."""
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


def _list_folder(root: Path, exclude_real: str | None) -> SourceListing:
    """A folder with subfolders is a class layout (top-level images stay unlabeled); else flat."""
    listing = SourceListing()
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


def _sorted_entries(directory: str, listing: SourceListing) -> list[os.DirEntry[str]]:
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
    listing: SourceListing,
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


def _add_file(listing: SourceListing, root: Path, relative: str, name: str, class_name: str | None) -> None:
    if name.startswith("."):
        listing.hide(relative)
        return
    if not is_image_file_name(name):
        listing.ignore(relative)
        return
    listing.files.append((str(root / relative), os.path.splitext(relative)[0], class_name))


def _read_path_list(list_path: Path) -> SourceListing:
    """``path[TAB label]`` per line; relative paths are relative to the list file's folder."""
    listing = SourceListing()
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


def _list_tar(tar_path: str) -> SourceListing:
    """The keys of a tar's image samples from its headers alone (runs in a worker).

    A truncated tar keeps the samples before the damage; the sample the damage falls in is
    dropped, exactly as ``iter_samples`` never yields it.
    """
    listing = SourceListing()
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


def _close_tar_sample(listing: SourceListing, tar_path: str, key: str | None, has_image: bool) -> None:
    if key is None:
        return
    if has_image:
        listing.tar_keys.append(key)
    else:
        listing.ignore(f"{tar_path}::{key}")
