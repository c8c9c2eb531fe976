"""Configuration of ``moco probe`` and ``moco knn``: one frozen dataclass from a probe recipe
(``recipes/probe/*.yaml``; ``lincls`` is the official protocol) and ``--set`` overrides.

Image settings left at 0 / null come from the pretraining run the backbone belongs to (its
``augment.size``, ``eval.image_size``, ``eval.crop_fraction``, ``augment.mean`` / ``std``), so a
CIFAR backbone is probed at 32 px with CIFAR's statistics without saying so; a backbone without
a run (torchvision, official MoCo) gets the ImageNet protocol: 224 px, crop 0.875, ImageNet stats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from moco_core.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_core.encoders import SUPPORTED_ARCHS
from moco_core.linear_probe import LinearProbeSettings
from pipelines.config import ConfigError, apply_overrides, from_dict, load_yaml
from pipelines.pretrain.config import (
    RECIPES_DIR,
    DataSection,
    ScalingSection,
    TrackingSection,
    recipe_path,
    trainer_threads,
)

PROBE_RECIPES_DIR = RECIPES_DIR / "probe"
DEFAULT_PROBE_RECIPE = "lincls"
MODES: tuple[str, ...] = ("full", "cached")


@dataclass(frozen=True)
class ProbeModelSection:
    """The backbone's architecture; null: from the run's config or inferred from the weights."""

    arch: str | None = None
    small_image_stem: bool | None = None


@dataclass(frozen=True)
class ProbeViewSection:
    """Training view: RandomResizedCrop(``size``, ``train_scale``) + flip. Validation / feature
    view: the central ``crop_fraction`` of the shorter side resized to ``size`` (0.875: resize
    256 + center crop 224; 1.0: the whole image). 0 / null: from the pretraining run, else ImageNet's."""

    size: int = 0
    crop_fraction: float = 0.0
    train_scale: tuple[float, ...] = (0.08, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ProbeOptimSection:
    """The linear layer's SGD (official main_lincls.py defaults). ``batch_size`` is global."""

    lr: float = 30.0
    weight_decay: float = 0.0
    sgd_momentum: float = 0.9
    epochs: int = 100
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    batch_size: int = 256


@dataclass(frozen=True)
class CachedSection:
    """``--mode cached`` (and ``moco knn``): features extracted once by Ray Data and reused.

    ``augmented_copies``: training-view copies per training image extracted besides the centre
    crop (each epoch uses one of them per image). ``extractors``: Ray Data actors running the
    backbone (0: one per GPU in the cluster, else one). ``batch_size``: images per forward."""

    augmented_copies: int = 0
    extractors: int = 0
    batch_size: int = 256


@dataclass(frozen=True)
class ProbeTrainingSection:
    """``precision``: the frozen backbone's forward (auto: bf16 autocast on GPUs, fp32 on CPUs).
    ``eval_every_epochs``: validation top-1/top-5 every this many epochs (and after the last)."""

    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    eval_every_epochs: int = 1
    torch_threads: int = 0  # 0: the CPUs a worker reserves


@dataclass(frozen=True)
class ProbeCheckpointSection:
    """``--mode full`` checkpoints (the fc layer, its optimiser, the stream position)."""

    every_epochs: int = 1
    keep: int = 2


@dataclass(frozen=True)
class ProbeDebugSection:
    """Testing aid: ``change_backbone_at_step`` adds noise to one backbone weight at that step,
    so the end-of-run sanity check must fail."""

    change_backbone_at_step: int = 0


def _probe_tracking() -> TrackingSection:
    return TrackingSection(experiment="moco-probe")


@dataclass(frozen=True)
class ProbeConfig:
    model: ProbeModelSection = field(default_factory=ProbeModelSection)
    view: ProbeViewSection = field(default_factory=ProbeViewSection)
    optim: ProbeOptimSection = field(default_factory=ProbeOptimSection)
    cached: CachedSection = field(default_factory=CachedSection)
    training: ProbeTrainingSection = field(default_factory=ProbeTrainingSection)
    checkpoint: ProbeCheckpointSection = field(default_factory=ProbeCheckpointSection)
    data: DataSection = field(default_factory=DataSection)
    tracking: TrackingSection = field(default_factory=_probe_tracking)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    debug: ProbeDebugSection = field(default_factory=ProbeDebugSection)

    @property
    def linear(self) -> LinearProbeSettings:
        """The classifier's hyperparameters: ``optim.*`` and the seed."""
        return LinearProbeSettings(**asdict(self.optim), seed=self.training.seed)

    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.batch_size // self.scaling.workers

    @property
    def trainer_threads(self) -> int:
        """Torch threads of a training worker (:func:`~pipelines.pretrain.config.trainer_threads`)."""
        return trainer_threads(self.training.torch_threads, self.scaling.cpus_per_worker)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        try:
            self.linear.validate()
        except ValueError as error:
            raise ConfigError(f"optim.{error}") from None
        view, cached = self.view, self.cached
        checks: list[tuple[bool, str]] = [
            (
                self.model.arch is None or self.model.arch in SUPPORTED_ARCHS,
                f"model.arch={self.model.arch!r} is invalid: expected one of {', '.join(SUPPORTED_ARCHS)}",
            ),
            (view.size == 0 or view.size >= 8, f"view.size={view.size} is invalid: expected 0 (from the run) or >= 8"),
            (
                0 <= view.crop_fraction <= 1,
                f"view.crop_fraction={view.crop_fraction} is invalid: expected in (0, 1], or 0 (from the run)",
            ),
            (
                len(view.train_scale) == 2 and 0 < view.train_scale[0] <= view.train_scale[1] <= 1,
                f"view.train_scale={list(view.train_scale)} is invalid: expected [low, high] in (0, 1]",
            ),
            (
                all(value is None or len(value) == 3 for value in (view.mean, view.std))
                and all(s > 0 for s in view.std or (1,)),
                "view.mean / view.std are invalid: expected three values (R, G, B), std > 0",
            ),
            (cached.augmented_copies >= 0, "cached.augmented_copies is invalid: expected >= 0"),
            (cached.extractors >= 0, "cached.extractors is invalid: expected >= 0 (0 = automatic)"),
            (cached.batch_size >= 1, "cached.batch_size is invalid: expected >= 1"),
            (self.training.eval_every_epochs >= 0, "training.eval_every_epochs is invalid: expected >= 0"),
            (self.training.torch_threads >= 0, "training.torch_threads is invalid: expected >= 0"),
            (self.checkpoint.every_epochs >= 1, "checkpoint.every_epochs is invalid: expected >= 1"),
            (self.checkpoint.keep >= 1, "checkpoint.keep is invalid: expected >= 1"),
            (self.scaling.workers >= 1, "scaling.workers is invalid: expected >= 1"),
            (self.scaling.cpus_per_worker >= 0, "scaling.cpus_per_worker is invalid: expected >= 0"),
            (self.scaling.gpus_per_worker >= 0, "scaling.gpus_per_worker is invalid: expected >= 0"),
            (
                self.optim.batch_size % self.scaling.workers == 0,
                f"optim.batch_size={self.optim.batch_size} is invalid: expected a multiple of "
                f"scaling.workers={self.scaling.workers}",
            ),
            (self.data.shuffle_pool >= 1, "data.shuffle_pool is invalid: expected >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def probe_recipe_path(name_or_path: str) -> Path:
    """A probe recipe by name (``recipes/probe/<name>.yaml``) or a path to a YAML file."""
    return recipe_path(name_or_path, PROBE_RECIPES_DIR, "probe recipe")


def probe_config_from_mapping(data: dict[str, Any]) -> ProbeConfig:
    config = from_dict(ProbeConfig, data)
    config.validate()
    return config


def load_probe_config(recipe: str | None = None, overrides: list[str] = ()) -> ProbeConfig:
    """A probe recipe (default ``lincls``) with ``key.sub=value`` overrides, validated.

    Raises:
        ConfigError: unknown recipe or key, or a bad value (one line naming the key).
    """
    data = load_yaml(probe_recipe_path(recipe or DEFAULT_PROBE_RECIPE))
    return probe_config_from_mapping(apply_overrides(data, list(overrides)))


@dataclass(frozen=True)
class ProbeView:
    """The image settings a probe runs with, resolved against the backbone's pretraining run.

    Attributes:
        size: view side in pixels.
        crop_fraction: centre crop of the validation / feature view.
        train_scale: RandomResizedCrop area range of the training view.
        mean, std: normalisation of [0, 1] pixels.
        source: where size / crop / statistics came from (``config`` or ``run`` or ``default``).
    """

    size: int
    crop_fraction: float
    train_scale: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


def resolve_view(config: ProbeConfig, pretrain_config: dict[str, Any] | None) -> ProbeView:
    """``config.view`` with its 0 / null fields filled from the pretraining run's config."""
    run = pretrain_config or {}
    augment, evaluation = run.get("augment", {}), run.get("eval", {})
    view = config.view
    size = view.size or evaluation.get("image_size") or augment.get("size") or 224
    crop = view.crop_fraction or evaluation.get("crop_fraction") or 0.875
    mean = view.mean or augment.get("mean") or IMAGENET_MEAN
    std = view.std or augment.get("std") or IMAGENET_STD
    filled = [name for name in ("size", "crop_fraction", "mean", "std") if not getattr(view, name)]
    source = "config" if not filled else ("run" if run else "default")
    return ProbeView(
        int(size),
        float(crop),
        (float(view.train_scale[0]), float(view.train_scale[1])),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        source,
    )
