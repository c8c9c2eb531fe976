"""MoCo (Momentum Contrast) as a pure-torch library: encoders, momentum encoder, queue, InfoNCE,
shuffle/split BatchNorm, the three contrastive mechanisms, schedules, kNN monitor and a
single-process training step. Importing it never imports Ray or MLflow.

Start at :mod:`moco_core.mechanisms` for the algorithm, :func:`moco_core.model.build_model` to
build one, and :func:`moco_core.training.train_step` to train it.
"""

from moco_core.batchnorm import SplitBatchNorm2d, convert_batchnorm, encode_with_shuffled_batch
from moco_core.encoders import SUPPORTED_ARCHS, Encoder, build_backbone
from moco_core.knn import extract_features, knn_predict, knn_top1
from moco_core.loss import ContrastiveLoss, in_batch_info_nce, info_nce
from moco_core.mechanisms import ContrastiveModel, EndToEnd, MemoryBankModel, MoCo
from moco_core.memory_bank import MemoryBank
from moco_core.model import ModelConfig, build_model
from moco_core.momentum import make_momentum_copy, momentum_update
from moco_core.queue import KeyQueue
from moco_core.schedules import build_lr_schedule, build_momentum_schedule, linear_scaled_lr
from moco_core.training import ComputeSettings, build_optimizer, train_step

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_ARCHS",
    "ComputeSettings",
    "ContrastiveLoss",
    "ContrastiveModel",
    "Encoder",
    "EndToEnd",
    "KeyQueue",
    "MemoryBank",
    "MemoryBankModel",
    "MoCo",
    "ModelConfig",
    "SplitBatchNorm2d",
    "build_backbone",
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
    "train_step",
]
