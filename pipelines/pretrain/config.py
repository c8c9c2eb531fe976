"""The pretraining job's configuration: one frozen dataclass, loaded from a recipe, validated
before Ray starts, written beside the outputs and into every checkpoint."""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from moco_core.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from moco_core.model import ModelConfig
from pipelines.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


def _recipes_dir() -> Path:
    """The built-in recipes: ``recipes/`` installed as the ``moco_recipes`` package (pyproject.toml),
    so a wheel, ``pip install .`` or a cluster image has them; a source checkout that is not
    installed, or was installed before they became package data, falls back to ``recipes/`` beside
    the code."""
    try:
        recipes = importlib.resources.files("moco_recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"
    # Installed packages are plain directories (wheels are unpacked), so this is a filesystem path.
    return Path(str(recipes))


RECIPES_DIR = _recipes_dir()


@dataclass(frozen=True)
class AugmentSection:
    """Two-view augmentation (see moco_core.augment). ``photometric``: where colour jitter,
    grayscale and blur run: ``cpu`` (ingest readers), ``device`` (batched on the training device)
    or ``auto`` (``device`` when training on GPUs, else ``cpu``, the faster on each; docs/BENCHMARKS.md).
    ``blur``: ``gaussian`` (a discrete Gaussian of variance sigma^2, the same on both placements)
    or ``pil`` (PIL's ``GaussianBlur``, as the official code calls it; runs in the readers, so
    ``auto`` then means ``cpu``). ``mean`` / ``std``: per-channel (R, G, B) statistics of [0, 1]
    pixels that training and evaluation input is normalised with (ImageNet's by default)."""

    recipe: Literal["v1", "v2", "cifar"] = "v2"
    size: int = 224
    crop_scale: tuple[float, ...] = (0.2, 1.0)
    photometric: Literal["auto", "cpu", "device"] = "auto"
    blur: Literal["gaussian", "pil"] = "gaussian"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def resolve(self, on_gpu: bool) -> AugmentConfig:
        placement = self.photometric
        if placement == "auto":
            placement = "device" if on_gpu and self.blur == "gaussian" else "cpu"
        return AugmentConfig(
            self.recipe,
            self.size,
            (self.crop_scale[0], self.crop_scale[1]),
            photometric=placement,
            blur=self.blur,
            mean=tuple(self.mean),
            std=tuple(self.std),
        )


@dataclass(frozen=True)
class DataSection:
    """How collections are read (docs/DATA.md). Column names ``null`` are detected."""

    layout: Literal["auto", "moco", "parquet", "webdataset", "folder"] = "auto"
    image_column: str | None = None
    label_column: str | None = None
    key_column: str | None = None
    readers: int = 0  # reader lanes in all (one CPU each); 0: the CPUs the trainer leaves free (>= 1 per worker)
    # Ray resources every reader lane requests besides its CPUs, e.g. {ingest: 1}: the lanes then
    # run only on nodes started with that custom resource (CPU-only reader nodes; docs/CLUSTER.md).
    reader_resources: dict[str, float] = field(default_factory=dict)
    shuffle: bool = True  # new unit order and row order every epoch
    shuffle_pool: int = 2048  # images read and shuffled together (encoded bytes held per reader lane)
    min_side: int = 8
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class OptimSection:
    """SGD and its learning-rate schedule. ``batch_size`` is global (all workers together)."""

    batch_size: int = 256
    lr: float = 0.03
    scale_lr: bool = False  # linear scaling rule: lr x batch_size / 256
    schedule: Literal["step", "cosine", "exponential", "constant"] = "step"
    milestones: tuple[float, ...] = (120.0, 160.0)  # epochs, for ``step``
    gamma: float = 0.1  # decay factor of ``step`` and ``exponential``
    decay_every_steps: int = 62_500  # for ``exponential``
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9


@dataclass(frozen=True)
class MomentumSection:
    """Momentum of the key encoder: ``constant`` or ``cosine`` (rising to 1)."""

    base: float = 0.999
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass(frozen=True)
class TrainingSection:
    """Length and numerics. ``total_steps > 0`` makes the run iteration-based (IG-1B recipe)."""

    epochs: float = 200.0
    total_steps: int = 0
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 if clearly faster (timed on CPUs), bf16 on GPUs
    channels_last: bool = True
    compile: Literal["auto", "encoders", "none"] = "auto"  # auto: encoders on CUDA, none elsewhere
    log_every_steps: int = 10
    torch_threads: int = 0  # 0: the CPUs the worker reserves (scaling.cpus_per_worker), at least 1
    host_allocator: Literal["reuse", "system"] = "reuse"  # reuse: malloc keeps freed memory for the next step


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000  # 0: only at epoch ends
    at_epoch_end: bool = True
    keep: int = 3


@dataclass(frozen=True)
class EvalSection:
    """Weighted kNN monitor (k=200, t=0.1 as in the official CIFAR demo) on labelled data.

    The evaluation view of an image is the central square of ``crop_fraction`` of its shorter
    side, resized to ``image_size`` (moco_core.augment.CenterCropTransform): 0.875 is the standard
    ImageNet crop (224 of 256); 1.0 takes the whole shorter side, which for square images (CIFAR's
    32 px) is the whole image, as the official CIFAR demo evaluates."""

    knn_k: int = 200
    knn_temperature: float = 0.1
    every_epochs: int = 1  # 0: only before and after training
    bank_size: int = 50_000  # at most this many labelled training images form the kNN bank
    batch_size: int = 256
    image_size: int = 0  # 0: the augmentation size
    crop_fraction: float = 0.875  # in (0, 1]; 1.0: no crop


@dataclass(frozen=True)
class TrackingSection:
    """MLflow. ``uri`` null: $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "moco-pretrain"
    run_name: str | None = None
    parent_run_id: str | None = None  # nest the run under this one (Tune sweeps)


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers; the CLI's --workers / --cpus-per-worker / --gpus-per-worker set these."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    # How Ray places the workers: PACK fills a node first (one 8-GPU machine for 8 workers);
    # SPREAD puts them on as many nodes as it can.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass(frozen=True)
class DebugSection:
    """Testing aids. ``fail_at_step``: the last worker raises once, at that step, on a fresh start.
    ``record_batches``: write which images every step trained on (local run directories only).
    ``damage_checkpoint_at_step``: on a fresh start, rank 0 truncates that step's ``model.pt`` once
    it is recorded, as a disk that loses data would (local run directories only)."""

    fail_at_step: int = 0
    damage_checkpoint_at_step: int = 0
    record_batches: bool = False  # every rank appends each batch's (epoch, index) to OUTPUT/debug_batches_rank<r>.jsonl


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    momentum: MomentumSection = field(default_factory=MomentumSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    debug: DebugSection = field(default_factory=DebugSection)

    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.batch_size // self.scaling.workers

    @property
    def trainer_threads(self) -> int:
        """Torch threads of a training worker: ``training.torch_threads``, or the CPUs it reserves
        (``scaling.cpus_per_worker`` rounded up, at least 1); the reader lanes have the others."""
        return trainer_threads(self.training.torch_threads, self.scaling.cpus_per_worker)

    @property
    def base_lr(self) -> float:
        """The lr at the schedule's start, after the linear scaling rule if enabled."""
        return self.optim.lr * self.optim.batch_size / 256 if self.optim.scale_lr else self.optim.lr

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        try:
            self.model.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        checks: list[tuple[bool, str]] = [
            (self.augment.size >= 8, f"augment.size={self.augment.size} is invalid: expected >= 8"),
            (
                len(self.augment.crop_scale) == 2 and 0 < self.augment.crop_scale[0] <= self.augment.crop_scale[1] <= 1,
                f"augment.crop_scale={list(self.augment.crop_scale)} is invalid: expected [low, high] in (0, 1]",
            ),
            (self.scaling.workers >= 1, f"scaling.workers={self.scaling.workers} is invalid: expected >= 1"),
            (self.scaling.cpus_per_worker >= 0, "scaling.cpus_per_worker is invalid: expected >= 0"),
            (self.scaling.gpus_per_worker >= 0, "scaling.gpus_per_worker is invalid: expected >= 0"),
            (self.scaling.max_failures >= 0, "scaling.max_failures is invalid: expected >= 0"),
            (self.optim.batch_size >= 1, f"optim.batch_size={self.optim.batch_size} is invalid: expected >= 1"),
            (
                self.optim.batch_size % self.scaling.workers == 0,
                f"optim.batch_size={self.optim.batch_size} is invalid: expected a multiple of "
                f"scaling.workers={self.scaling.workers} (the global batch is split evenly)",
            ),
            (self.optim.lr > 0, f"optim.lr={self.optim.lr} is invalid: expected > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay is invalid: expected >= 0"),
            (0 <= self.optim.sgd_momentum < 1, "optim.sgd_momentum is invalid: expected in [0, 1)"),
            (self.optim.gamma > 0, "optim.gamma is invalid: expected > 0"),
            (self.optim.decay_every_steps >= 1, "optim.decay_every_steps is invalid: expected >= 1"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps is invalid: expected >= 0"),
            (
                list(self.optim.milestones) == sorted(self.optim.milestones),
                "optim.milestones is invalid: expected increasing epochs",
            ),
            (0 <= self.momentum.base <= 1, f"momentum.base={self.momentum.base} is invalid: expected in [0, 1]"),
            (
                self.training.epochs >= 0,
                f"training.epochs={self.training.epochs} is invalid: expected >= 0 "
                "(0: training.total_steps sets the length)",
            ),
            (
                self.training.epochs > 0 or self.training.total_steps > 0,
                "training.epochs and training.total_steps are both 0: give one of them",
            ),
            (self.training.total_steps >= 0, "training.total_steps is invalid: expected >= 0"),
            (self.training.log_every_steps >= 1, "training.log_every_steps is invalid: expected >= 1"),
            (self.training.torch_threads >= 0, "training.torch_threads is invalid: expected >= 0"),
            (self.checkpoint.every_steps >= 0, "checkpoint.every_steps is invalid: expected >= 0"),
            (self.checkpoint.keep >= 1, f"checkpoint.keep={self.checkpoint.keep} is invalid: expected >= 1"),
            (self.eval.knn_k >= 1 and self.eval.knn_temperature > 0, "eval.knn_k / eval.knn_temperature invalid"),
            (self.eval.bank_size >= 1 and self.eval.batch_size >= 1, "eval.bank_size / eval.batch_size invalid"),
            (
                self.eval.every_epochs >= 0,
                f"eval.every_epochs={self.eval.every_epochs} is invalid: expected >= 0 "
                "(0: only before and after training)",
            ),
            (
                self.eval.image_size == 0 or self.eval.image_size >= 8,
                f"eval.image_size={self.eval.image_size} is invalid: expected >= 8, or 0 for the augmentation size",
            ),
            (
                0 < self.eval.crop_fraction <= 1,
                f"eval.crop_fraction={self.eval.crop_fraction} is invalid: expected in (0, 1] (1.0: the whole image)",
            ),
            (self.data.readers >= 0, "data.readers is invalid: expected >= 0 (0 = automatic)"),
            (
                all(amount > 0 for amount in self.data.reader_resources.values())
                and not {"CPU", "GPU"} & set(self.data.reader_resources),
                f"data.reader_resources={self.data.reader_resources} is invalid: expected custom resources "
                "with amounts > 0, e.g. {ingest: 1} (a lane's CPUs follow from data.readers)",
            ),
            (self.data.shuffle_pool >= 1, f"data.shuffle_pool={self.data.shuffle_pool} is invalid: expected >= 1"),
            (self.data.min_side >= 1 and self.data.max_pixels >= 1, "data.min_side / data.max_pixels invalid"),
            (
                not (self.model.batchnorm == "sync" and self.scaling.workers > 1 and self.scaling.gpus_per_worker == 0),
                "model.batchnorm=sync needs GPUs when scaling.workers > 1 (torch's SyncBatchNorm is GPU-only); "
                "use shuffle or auto",
            ),
            (
                not (self.model.batchnorm == "shuffle" and self.scaling.workers == 1),
                "model.batchnorm=shuffle needs scaling.workers > 1; with one worker use split or auto",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        one_worker_split = self.model.batchnorm == "split" or (
            self.model.batchnorm == "auto" and self.scaling.workers == 1
        )
        if one_worker_split and self.per_worker_batch_size % self.model.bn_splits:
            raise ConfigError(
                f"model.bn_splits={self.model.bn_splits} is invalid: split BatchNorm needs the per-worker batch "
                f"({self.per_worker_batch_size}) to be a multiple of it"
            )
        try:
            self.augment.resolve(on_gpu=False).validate()
        except ValueError as error:
            raise ConfigError(str(error)) from None


def trainer_threads(torch_threads: int, cpus_per_worker: float) -> int:
    """Torch threads of a training worker: ``torch_threads`` if set (> 0), else the CPUs it reserves
    rounded up, at least 1 (pretraining and the full probe alike)."""
    return torch_threads or max(1, math.ceil(cpus_per_worker))


def recipe_path(name_or_path: str, directory: Path = RECIPES_DIR, kind: str = "recipe") -> Path:
    """A ``kind`` by name (``<directory>/<name>.yaml``; pretraining recipes in :data:`RECIPES_DIR`
    by default) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        return candidate
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"unknown {kind} {name_or_path!r}; built-in {kind}s: {known}; or give a YAML path")
    return path


def config_from_mapping(data: dict[str, Any]) -> PretrainConfig:
    """A validated config from a nested mapping (a recipe after overrides, or a checkpoint's copy)."""
    config = from_dict(PretrainConfig, data)
    config.validate()
    return config


def load_config(recipe: str, overrides: list[str] = (), scaling: dict[str, Any] | None = None) -> PretrainConfig:
    """Load a recipe, apply ``key.sub=value`` overrides and scaling options, validate.

    Raises:
        ConfigError: unknown recipe, unknown key, bad value (one line naming the key).
    """
    data = apply_overrides(load_yaml(recipe_path(recipe)), list(overrides))
    config = from_dict(PretrainConfig, data)
    if scaling:
        config = replace(config, scaling=replace(config.scaling, **scaling))
    config.validate()
    return config


def plan_steps(config: PretrainConfig, num_images: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for a collection of ``num_images``.

    Raises:
        ConfigError: the collection is smaller than one global batch.
    """
    steps_per_epoch = num_images // config.optim.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"optim.batch_size={config.optim.batch_size} is larger than the training data ({num_images} images)"
        )
    total = config.training.total_steps or int(math.ceil(config.training.epochs * steps_per_epoch))
    return steps_per_epoch, total


def config_to_dict(config: PretrainConfig) -> dict[str, Any]:
    return to_dict(config)
