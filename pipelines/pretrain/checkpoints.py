"""Pretraining checkpoints: everything to resume, with stable keys, loadable with weights_only.

A checkpoint directory holds:

* ``model.pt`` -- the unwrapped model state dict: ``query_encoder.*``, ``momentum_encoder.*``,
  ``queue.keys``, ``queue.pointer`` (``memory_bank.features`` for that mechanism);
* ``training_state.pt`` -- optimizer state and every rank's RNG streams (torch CPU, CUDA, the
  photometric generator);
* ``state.json`` -- step, epoch, images seen, the MLflow run id, the stream layout and every
  reader lane's last consumed position;
* ``config.yaml`` -- the resolved configuration.

Ray Train registers a checkpoint only after it is fully uploaded, and rank 0 rewrites
``latest_checkpoint.json`` in the run directory (write to a temporary name, then rename) only
after that, so a partly written checkpoint is never picked up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipelines.pretrain.run_files import read_json, write_json

FORMAT_VERSION = 1
POINTER_NAME = "latest_checkpoint.json"


@dataclass
class TrainingState:
    """Progress through the run. ``stream_positions`` holds, per reader lane, the packed position
    of the last image trained on (pipelines.ingest.stream); a resumed stream starts right after."""

    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    mlflow_run_id: str | None = None
    knn_top1_random_init: float | None = None
    stream_layout: dict[str, Any] | None = None
    stream_positions: list[int] | None = None


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


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    config: dict[str, Any],
    random_states: list[RankRandomState] | None = None,
) -> None:
    """Write a checkpoint into ``directory`` (created if needed); ``random_states`` by rank."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict()}, directory / "model.pt")
    torch.save(
        {"optimizer": optimizer.state_dict(), "random_states": [asdict(rank) for rank in random_states or []]},
        directory / "training_state.pt",
    )
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (directory / "state.json").write_text(json.dumps(asdict(state), indent=2))


def load_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[TrainingState, list[RankRandomState]]:
    """Restore ``model`` (and ``optimizer``) from ``directory``; returns the training state and
    the random states by rank. Everything is loaded with ``weights_only=True``."""
    saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {saved.get('format_version')} is not {FORMAT_VERSION}")
    model.load_state_dict(saved["model"])
    training = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(training["optimizer"])
    random_states = [RankRandomState(**rank) for rank in training.get("random_states", [])]
    known = set(TrainingState.__dataclass_fields__)
    fields = {key: value for key, value in json.loads((directory / "state.json").read_text()).items() if key in known}
    return TrainingState(**fields), random_states


def load_backbone_state(directory: Path) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights, keyed like a torchvision model without ``fc``."""
    saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    prefix = "query_encoder.backbone."
    return {key[len(prefix) :]: value for key, value in saved["model"].items() if key.startswith(prefix)}


def write_pointer(run_dir: str, checkpoint_path: str, state: TrainingState) -> None:
    """Record the newest complete checkpoint in ``run_dir`` (atomically)."""
    write_json(run_dir, POINTER_NAME, {"path": checkpoint_path, **asdict(state)})


def read_pointer(run_dir: str) -> dict[str, Any] | None:
    """The newest complete checkpoint recorded in ``run_dir``, or None."""
    return read_json(run_dir, POINTER_NAME)
