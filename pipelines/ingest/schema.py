"""The shard format written by ``moco shard`` and its manifest (documented in docs/DATA.md)."""

from __future__ import annotations

import json
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
        data = json.loads(text)
        data["skipped"] = [SkippedFile(**item) for item in data.get("skipped", [])]
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})
