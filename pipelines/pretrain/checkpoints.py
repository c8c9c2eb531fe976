"""Pretraining checkpoints: everything to resume, with stable keys, loadable with weights_only.

A checkpoint directory holds:

* ``model.pt`` -- the unwrapped model state dict: ``query_encoder.*``, ``momentum_encoder.*``,
  ``queue.keys``, ``queue.pointer`` (``memory_bank.features`` for that mechanism);
* ``training_state.pt`` -- optimizer state and every rank's RNG streams (torch CPU, CUDA, the
  photometric generator);
* ``config.yaml`` -- the resolved configuration;
* ``state.json`` -- step, epoch, images seen, the run's planned steps, the MLflow run id, the
  stream layout and every reader lane's last consumed position, and the size and SHA-256 of
  ``model.pt`` and ``training_state.pt``. Written last, each file through a temporary name and
  a rename: a checkpoint without it is incomplete.

A checkpoint is verified when it is written (rank 0 checks the stored copy against its
``state.json`` before recording it in ``latest_checkpoint.json``) and before it is loaded
(:func:`verify_checkpoint`). A damaged one is passed over for the newest intact one before it
(:func:`newest_intact_checkpoint`), so a resume or a restart never loads a truncated file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import yaml

from pipelines.filesystems import join, resolve_filesystem
from pipelines.pretrain.run_files import read_json, read_text, write_json

FORMAT_VERSION = 1
POINTER_NAME = "latest_checkpoint.json"
#: Ray Train's run name: checkpoints are ``OUTPUT/train/checkpoint_step<step>[-<n>]``.
TRAIN_DIR = "train"
STATE_FILE = "state.json"
#: The files whose size and SHA-256 ``state.json`` records.
VERIFIED_FILES = ("model.pt", "training_state.pt")
_NAME = re.compile(r"checkpoint_step(\d+)(?:-(\d+))?")
_HASH_CHUNK = 8 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be loaded as written; the message names the file and what is wrong."""


@dataclass
class TrainingState:
    """Progress through the run. ``stream_positions`` holds, per reader lane, the packed position
    of the last image trained on (pipelines.ingest.stream); a resumed stream starts right after.
    ``total_steps``: the steps the run was planned for when the checkpoint was written."""

    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    total_steps: int = 0
    mlflow_run_id: str | None = None
    knn_top1_random_init: float | None = None
    stream_layout: dict[str, Any] | None = None
    stream_positions: list[int] | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainingState:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in record.items() if key in known})


@dataclass
class RankRandomState:
    """One rank's random streams: torch's CPU generator, the CUDA one, the photometric generator."""

    torch_cpu: torch.Tensor
    cuda: torch.Tensor | None
    photometric: torch.Tensor

    @classmethod
    def capture(cls, photometric: torch.Generator, device: torch.device) -> RankRandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, photometric.get_state())

    def restore(self, photometric: torch.Generator, device: torch.device) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda, device)
        photometric.set_state(self.photometric)


def checkpoint_name(step: int, attempt: int = 0) -> str:
    """``checkpoint_step000000042``; ``-<attempt>`` when a run that fell back to an older
    checkpoint writes the same step again (the older directory is still Ray Train's to delete)."""
    return f"checkpoint_step{step:09d}" + (f"-{attempt}" if attempt else "")


def _order(name: str) -> tuple[int, int] | None:
    """(step, attempt) of a checkpoint directory name, None for other names."""
    match = _NAME.fullmatch(name)
    return (int(match[1]), int(match[2] or 0)) if match else None


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    config: dict[str, Any],
    random_states: list[RankRandomState] | None = None,
) -> None:
    """Write a checkpoint into ``directory`` (created if needed); ``random_states`` by rank.

    ``state.json`` goes last and records the size and SHA-256 of the files before it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    contents = {
        "model.pt": {"format_version": FORMAT_VERSION, "model": model.state_dict()},
        "training_state.pt": {
            "optimizer": optimizer.state_dict(),
            "random_states": [asdict(rank) for rank in random_states or []],
        },
    }
    files = {}
    for name, content in contents.items():
        buffer = io.BytesIO()
        torch.save(content, buffer)
        data = buffer.getbuffer()
        _write_atomically(directory / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomically(directory / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    _write_atomically(directory / STATE_FILE, json.dumps({**asdict(state), "files": files}, indent=2).encode())


def verify_checkpoint(path: str, checksums: bool = True) -> TrainingState:
    """The training state of the checkpoint at ``path`` (a local path or URI), once every file
    its ``state.json`` records has the recorded size and (``checksums``) SHA-256.

    Raises:
        DamagedCheckpoint: a file is missing, truncated or altered; the message names it.
    """
    filesystem, base = resolve_filesystem(path)
    state_text = read_text(path, STATE_FILE)
    if state_text is None:
        raise DamagedCheckpoint(f"{join(path, STATE_FILE)} is missing (the checkpoint was not completely written)")
    try:
        record = json.loads(state_text)
        files = record.get("files", {})
    except (ValueError, AttributeError) as error:
        raise DamagedCheckpoint(f"{join(path, STATE_FILE)} is not a checkpoint record ({error})") from None
    for name, expected in files.items():
        info = filesystem.get_file_info(posixpath.join(base, name))
        if info.type != pafs.FileType.File:
            raise DamagedCheckpoint(f"{join(path, name)} is missing")
        file = posixpath.join(base, name)
        damage = recorded_damage(info.size, expected, partial(_sha256, filesystem, file) if checksums else None)
        if damage:
            raise DamagedCheckpoint(f"{join(path, name)} {damage}")
    return TrainingState.from_record(record)


def recorded_damage(size: int, expected: Mapping[str, Any], sha256: Callable[[], str] | None) -> str | None:
    """How a checkpoint file of ``size`` bytes (and SHA-256 ``sha256()``, when given) differs from
    its record in ``state.json`` (``{"bytes", "sha256"}``), or None when it matches."""
    if size != expected["bytes"]:
        return f"has {size} bytes, {expected['bytes']} when written"
    if sha256 is not None and sha256() != expected["sha256"]:
        return "does not match the SHA-256 recorded when it was written"
    return None


def _sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[TrainingState, list[RankRandomState]]:
    """Restore ``model`` (and ``optimizer``) from ``directory``; returns the training state and
    the random states by rank. Everything is loaded with ``weights_only=True``.

    Raises:
        DamagedCheckpoint: a file fails verification or cannot be loaded.
    """
    state = verify_checkpoint(str(directory))
    try:
        saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        if saved.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {saved.get('format_version')} is not {FORMAT_VERSION}")
        training = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- any unreadable file (a checkpoint from before checksums)
        raise DamagedCheckpoint(f"{directory}: cannot be loaded ({type(error).__name__}: {error})") from None
    model.load_state_dict(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(training["optimizer"])
    random_states = [RankRandomState(**rank) for rank in training.get("random_states", [])]
    return state, random_states


def load_backbone_state(directory: Path) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights, keyed like a torchvision model without ``fc``."""
    saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    prefix = "query_encoder.backbone."
    return {key[len(prefix) :]: value for key, value in saved["model"].items() if key.startswith(prefix)}


def list_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint directories of the run in ``run_dir``, newest first (by step, then attempt)."""
    filesystem, base = resolve_filesystem(run_dir)
    train = posixpath.join(base, TRAIN_DIR)
    if filesystem.get_file_info(train).type != pafs.FileType.Directory:
        return []
    names = [
        info.base_name
        for info in filesystem.get_file_info(pafs.FileSelector(train))
        if info.type == pafs.FileType.Directory and _order(info.base_name) is not None
    ]
    names.sort(key=_order, reverse=True)
    return [join(join(run_dir, TRAIN_DIR), name) for name in names]


def newest_checkpoint_name(*paths: str | None) -> str | None:
    """The newest (by step, then attempt) of the checkpoints named by ``paths`` (directories or
    URIs; None entries are skipped), as a directory name.

    A restart asks for both the checkpoint Ray Train hands over and the one the run's pointer file
    records: the worker writes the pointer once its checkpoint is in storage, which can be before
    Ray Train's controller has registered it, so after a failure in between the pointer is newer.
    """
    names = [posixpath.basename(path.rstrip("/")) for path in paths if path]
    return max(names, key=lambda name: _order(name) or (-1, 0), default=None)


def checkpoints_not_after(run_dir: str, newest: str) -> list[str]:
    """The run's checkpoints from the one named ``newest`` (a directory name) back, newest first."""
    limit = _order(newest)
    if limit is None:
        return [join(join(run_dir, TRAIN_DIR), newest)]
    return [path for path in list_checkpoints(run_dir) if (_order(posixpath.basename(path)) or (0, 0)) <= limit]


@dataclass(frozen=True)
class IntactCheckpoint:
    """The checkpoint to continue from, and the newer ones passed over.

    Attributes:
        path: the checkpoint directory (local path or URI).
        state: its training state.
        damaged: one line per newer checkpoint that failed verification, newest first.
        damaged_paths: those checkpoints' directories.
    """

    path: str
    state: TrainingState
    damaged: tuple[str, ...] = ()
    damaged_paths: tuple[str, ...] = ()


def newest_intact_checkpoint(candidates: list[str], skip: Collection[str] = ()) -> IntactCheckpoint | None:
    """The first of ``candidates`` (newest first) that verifies; ``skip``: paths known to be damaged.

    Returns:
        None when there are no candidates.

    Raises:
        DamagedCheckpoint: every candidate is damaged; the message names the newest one's file.
    """
    damaged: list[str] = []
    damaged_paths: list[str] = []
    for path in candidates:
        if path in skip:
            continue
        try:
            state = verify_checkpoint(path)
        except DamagedCheckpoint as error:
            damaged.append(str(error))
            damaged_paths.append(path)
            continue
        return IntactCheckpoint(path, state, tuple(damaged), tuple(damaged_paths))
    if damaged:
        more = f" (and {len(damaged) - 1} older checkpoints are damaged too)" if len(damaged) > 1 else ""
        raise DamagedCheckpoint(f"no intact checkpoint: {damaged[0]}{more}")
    return None


def write_pointer(run_dir: str, checkpoint_path: str, state: TrainingState) -> None:
    """Record the newest complete checkpoint in ``run_dir`` (atomically)."""
    write_json(run_dir, POINTER_NAME, {"path": checkpoint_path, **asdict(state)})


def read_pointer(run_dir: str) -> dict[str, Any] | None:
    """The newest complete checkpoint recorded in ``run_dir``, or None.

    Raises:
        DamagedCheckpoint: the pointer file is not a checkpoint record; the message names it.
    """
    try:
        pointer = read_json(run_dir, POINTER_NAME)
    except ValueError as error:
        raise DamagedCheckpoint(f"{join(run_dir, POINTER_NAME)} is not valid JSON ({error})") from None
    if pointer is not None and not (isinstance(pointer, dict) and isinstance(pointer.get("path"), str)):
        raise DamagedCheckpoint(f"{join(run_dir, POINTER_NAME)} does not name a checkpoint")
    return pointer


def newest_recorded_checkpoint(run_dir: str) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint the run recorded, for messages: the pointer's, else
    the newest checkpoint directory (not verified)."""
    try:
        pointer = read_pointer(run_dir)
    except DamagedCheckpoint:
        pointer = None
    if pointer is not None:
        return pointer["path"], int(pointer.get("step", 0))
    paths = list_checkpoints(run_dir)
    if not paths:
        return None
    order = _order(posixpath.basename(paths[0]))
    return paths[0], order[0] if order else 0


def holds_run(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a run's checkpoints (or a record of them)."""
    return read_text(run_dir, POINTER_NAME) is not None or bool(list_checkpoints(run_dir))
