"""The shard format written by ``moco shard`` and its manifest (documented in docs/DATA.md)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"

#: One row per image. ``image`` holds the original encoded bytes (or a downscaled JPEG when the
#: shards were built with ``--max-side``); ``label`` is null for unlabeled images.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)


@dataclass
class SkippedFile:
    source: str  # path, or "tar_path::member"
    reason: str  # one of moco_core.image_io.SKIP_REASONS, or "unreadable"
    detail: str = ""


@dataclass
class Manifest:
    """``DIR/_manifest.json``: what a shard directory holds."""

    schema_version: int = SCHEMA_VERSION
    num_images: int = 0
    num_shards: int = 0
    # {"path", "num_images", "num_row_groups"}; ``moco shard`` adds "num_bytes", "num_skipped",
    # "skipped_offset" (this shard's entries are skipped[offset:offset + num_skipped]) and
    # "converted_by_mode".
    shards: list[dict[str, Any]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # label i is class_names[i]; empty if unlabeled
    skipped: list[SkippedFile] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    max_side: int | None = None
    # Added for resuming ``moco shard``; older manifests load with the defaults.
    fingerprint: str = ""  # hash of the shard plan (listing + options); a rerun must match it
    options: dict[str, Any] = field(default_factory=dict)  # the options the shards were built with
    converted_by_mode: dict[str, int] = field(default_factory=dict)  # kept images whose mode was not RGB
    num_ignored: int = 0  # files / tar samples without an image extension
    num_hidden: int = 0  # hidden files, never taken as images

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest in ``text``.

        Raises:
            ValueError: ``text`` is not JSON (a ``json.JSONDecodeError``), or not a manifest's
                structure (the message names the field).
        """
        data = json.loads(text)
        problem = _structure_problem(data)
        if problem:
            raise ValueError(problem)
        data["skipped"] = [SkippedFile(**item) for item in data.get("skipped", [])]
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


class ManifestError(ValueError):
    """A ``_manifest.json`` that cannot be read; the message names it and says how to rebuild it."""


def read_manifest(path: str, text: str) -> Manifest:
    """The manifest at ``path``, whose content is ``text``.

    Raises:
        ManifestError: ``text`` is not JSON, or not a manifest ``moco shard`` writes.
    """
    # Not "rerun moco shard": it refuses a directory whose manifest it cannot read (shard_output.py).
    rebuild = (
        "rebuild the shards: rerun 'moco shard' on the sources with a new --output, "
        f"or after deleting {posixpath.dirname(path) or '.'}"
    )
    try:
        return Manifest.from_json(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); {rebuild}") from None
    except ValueError as error:
        raise ManifestError(f"{path} is not a manifest written by 'moco shard' ({error}); {rebuild}") from None


_SHARD_FIELDS = {"path": str, "num_images": int, "num_row_groups": int}
_SKIPPED_FIELDS = {"source", "reason", "detail"}
_LIST_FIELDS = ("shards", "class_names", "skipped", "sources")


def _structure_problem(data: Any) -> str | None:
    """What keeps the parsed JSON ``data`` from being a manifest, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if "shards" not in data:
        return "no 'shards' field"
    for name in _LIST_FIELDS:
        if not isinstance(data.get(name, []), list):
            return f"'{name}' is not a list"
    options = data.get("options", {})
    if not isinstance(options, dict) or not isinstance(options.get("row_group_size", 0), int):
        return "'options' is not an object with an int 'row_group_size'"
    for index, shard in enumerate(data["shards"]):
        for name, kind in _SHARD_FIELDS.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(name), kind):
                return f"shards[{index}] has no {kind.__name__} '{name}'"
    for index, skipped in enumerate(data.get("skipped", [])):
        if not isinstance(skipped, dict) or not {"source", "reason"} <= skipped.keys() <= _SKIPPED_FIELDS:
            return f"skipped[{index}] is not an object with 'source', 'reason' and optionally 'detail'"
    return None
