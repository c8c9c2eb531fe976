"""The ``moco shard`` output directory: locking, conflict checks, resuming, temporaries, shard log.

A rerun on the same directory keeps the shards that the manifest, or the log of a killed run,
records for the same plan, and refuses a directory holding shards made from other inputs or
options rather than mixing the two.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.ingest.schema import MANIFEST_NAME, Manifest
from pipelines.ingest.shard_plan import ShardOptions, ShardPlan, options_record
from pipelines.ingest.shard_writer import TEMPORARY_MARKER, ShardResult, temporary_path

LOG_NAME = "_shard_log.jsonl"


class OutputConflictError(ValueError):
    """The output directory holds shards (or other Parquet files) that this plan did not make."""


def checked_output_dir(output: Path) -> Path:
    """The absolute path of ``output``, which must be a directory or not exist yet (it is created
    once there is something to write)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory")
    return output.resolve()


@contextlib.contextmanager
def locked_directory(directory: Path) -> Iterator[None]:
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


def log_header(plan: ShardPlan, options: ShardOptions) -> dict[str, Any]:
    """The first line of the shard log: what a resumed run must match."""
    return {"fingerprint": plan.fingerprint, "options": options_record(options), "sources": plan.sources}


def load_finished_shards(output: Path, plan: ShardPlan, options: ShardOptions) -> dict[str, ShardResult]:
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
    new_options = options_record(options)
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


def remove_stale_temporaries(output: Path, plan: ShardPlan) -> None:
    """Delete half-written files of a killed run (only temporaries of names this plan owns)."""
    owned = {*plan.shard_names, MANIFEST_NAME}
    for entry in os.scandir(output):
        name, marker, _ = entry.name.partition(TEMPORARY_MARKER)
        if marker and name in owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class ShardLog:
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

    def __enter__(self) -> ShardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def write_if_changed(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, unless it already holds exactly that."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    temporary = temporary_path(path)
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
