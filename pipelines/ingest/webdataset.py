"""WebDataset tar reading: consecutive members sharing a key form one sample (img2dataset layout)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def is_image_file_name(name: str) -> bool:
    """An image by extension, and not hidden (macOS ``._x.jpg`` resource forks are not images)."""
    stem, dot, extension = name.rpartition(".")
    return bool(dot and stem) and not name.startswith(".") and extension.lower() in IMAGE_EXTENSIONS


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); the key ends at the first dot of the basename."""
    directory, _, basename = name.rpartition("/")
    stem, dot, extension = basename.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower() if dot else ""


def iter_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` per sample of a WebDataset tar stream, in tar order.

    Members that are not regular files are ignored. A truncated tar ends the iteration after the
    last complete sample and raises ``tarfile.ReadError`` from the iterator.
    """
    current_key: str | None = None
    current: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = split_member_name(member.name)
            if key != current_key:
                if current_key is not None and current:
                    yield current_key, current
                current_key, current = key, {}
            extracted = archive.extractfile(member)
            current[extension] = extracted.read() if extracted is not None else b""
    if current_key is not None and current:
        yield current_key, current


def image_entry(sample: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The sample's image (extension, bytes), preferring the img2dataset order jpg, png, webp."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return extension, sample[extension]
    return None


def class_label(sample: dict[str, bytes]) -> int | None:
    """The integer label of a ``.cls`` entry, or None."""
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode("utf-8").strip())
    except ValueError:
        return None
