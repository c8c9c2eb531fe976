"""MoCo (Momentum Contrast) as a pure-torch library: encoders, momentum encoder, queue, InfoNCE,
shuffle/split BatchNorm, the three contrastive mechanisms, schedules, kNN monitor, the linear
classification protocol, augmentation and a single-process training step. Importing it never imports Ray or MLflow.

Start at :mod:`moco_core.mechanisms` for the algorithm, :func:`moco_core.model.build_model` to
build one, and :func:`moco_core.training.train_step` to train it.

Names are imported lazily, so ``moco_core.image_io`` and ``moco_core.augment`` (what the data
readers need) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AugmentConfig": "augment",
    "CenterCropTransform": "augment",
    "RandomResizedCropTransform": "augment",
    "TwoViewTransform": "augment",
    "SplitBatchNorm2d": "batchnorm",
    "convert_batchnorm": "batchnorm",
    "encode_with_shuffled_batch": "batchnorm",
    "SUPPORTED_ARCHS": "encoders",
    "Encoder": "encoders",
    "build_backbone": "encoders",
    "ImageDecodeError": "image_io",
    "ImageLimits": "image_io",
    "extract_features": "knn",
    "knn_predict": "knn",
    "knn_top1": "knn",
    "LinearProbeSettings": "linear_probe",
    "build_linear_classifier": "linear_probe",
    "train_linear_classifier": "linear_probe",
    "ContrastiveLoss": "loss",
    "in_batch_info_nce": "loss",
    "info_nce": "loss",
    "ContrastiveModel": "mechanisms",
    "EndToEnd": "mechanisms",
    "MemoryBankModel": "mechanisms",
    "MoCo": "mechanisms",
    "MemoryBank": "memory_bank",
    "ModelConfig": "model",
    "build_model": "model",
    "make_momentum_copy": "momentum",
    "momentum_update": "momentum",
    "normalize_batch": "photometric",
    "photometric_batch": "photometric",
    "prepare_model_input": "photometric",
    "KeyQueue": "queue",
    "build_lr_schedule": "schedules",
    "build_momentum_schedule": "schedules",
    "linear_scaled_lr": "schedules",
    "ComputeSettings": "training",
    "build_optimizer": "training",
    "train_step": "training",
}

__all__ = [
    "AugmentConfig",
    "CenterCropTransform",
    "ComputeSettings",
    "ContrastiveLoss",
    "ContrastiveModel",
    "Encoder",
    "EndToEnd",
    "ImageDecodeError",
    "ImageLimits",
    "KeyQueue",
    "MemoryBank",
    "MemoryBankModel",
    "LinearProbeSettings",
    "MoCo",
    "ModelConfig",
    "RandomResizedCropTransform",
    "SUPPORTED_ARCHS",
    "SplitBatchNorm2d",
    "TwoViewTransform",
    "build_backbone",
    "build_linear_classifier",
    "build_lr_schedule",
    "build_model",
    "build_momentum_schedule",
    "build_optimizer",
    "convert_batchnorm",
    "encode_with_shuffled_batch",
    "extract_features",
    "in_batch_info_nce",
    "info_nce",
    "knn_predict",
    "knn_top1",
    "linear_scaled_lr",
    "make_momentum_copy",
    "momentum_update",
    "normalize_batch",
    "photometric_batch",
    "prepare_model_input",
    "train_linear_classifier",
    "train_step",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moco_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moco_core.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from moco_core.augment import AugmentConfig, CenterCropTransform, RandomResizedCropTransform, TwoViewTransform
    from moco_core.batchnorm import SplitBatchNorm2d, convert_batchnorm, encode_with_shuffled_batch
    from moco_core.encoders import SUPPORTED_ARCHS, Encoder, build_backbone
    from moco_core.image_io import ImageDecodeError, ImageLimits
    from moco_core.knn import extract_features, knn_predict, knn_top1
    from moco_core.linear_probe import LinearProbeSettings, build_linear_classifier, train_linear_classifier
    from moco_core.loss import ContrastiveLoss, in_batch_info_nce, info_nce
    from moco_core.mechanisms import ContrastiveModel, EndToEnd, MemoryBankModel, MoCo
    from moco_core.memory_bank import MemoryBank
    from moco_core.model import ModelConfig, build_model
    from moco_core.momentum import make_momentum_copy, momentum_update
    from moco_core.photometric import normalize_batch, photometric_batch, prepare_model_input
    from moco_core.queue import KeyQueue
    from moco_core.schedules import build_lr_schedule, build_momentum_schedule, linear_scaled_lr
    from moco_core.training import ComputeSettings, build_optimizer, train_step
