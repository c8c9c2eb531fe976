"""Small files in a run directory (a local path or a pyarrow URI), written atomically."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

from pipelines.filesystems import resolve_filesystem


def write_bytes(run_dir: str, name: str, data: bytes) -> None:
    """Write ``data`` to ``run_dir/name`` through a temporary file and a rename."""
    filesystem, base = resolve_filesystem(run_dir)
    filesystem.create_dir(base, recursive=True)
    temporary = posixpath.join(base, f".{name}.tmp")
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(data)
    filesystem.move(temporary, posixpath.join(base, name))


def write_text(run_dir: str, name: str, text: str) -> None:
    """Write ``text`` to ``run_dir/name`` through a temporary file and a rename."""
    write_bytes(run_dir, name, text.encode())


def read_text(run_dir: str, name: str) -> str | None:
    """The text of ``run_dir/name``, or None when the file does not exist."""
    filesystem, base = resolve_filesystem(run_dir)
    path = posixpath.join(base, name)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def remove_file(run_dir: str, name: str) -> None:
    """Delete ``run_dir/name`` if it exists."""
    filesystem, base = resolve_filesystem(run_dir)
    path = posixpath.join(base, name)
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        filesystem.delete_file(path)


def write_json(run_dir: str, name: str, data: Any) -> None:
    write_text(run_dir, name, json.dumps(data, indent=2))


def read_json(run_dir: str, name: str) -> Any | None:
    text = read_text(run_dir, name)
    return None if text is None else json.loads(text)


def logged_losses(run_dir: str) -> list[float]:
    """The run's logged pretext losses from ``metrics.jsonl``, in step order (a step a resumed run
    logged again counts once, with its newest value)."""
    text = read_text(run_dir, "metrics.jsonl") or ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_step = {row["step"]: float(row["loss"]) for row in rows if "loss" in row}
    return [by_step[step] for step in sorted(by_step)]
