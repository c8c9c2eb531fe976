"""Model configuration and construction: one frozen dataclass -> one contrastive model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moco_core.batchnorm import BATCHNORM_MODES, BatchNormMode, convert_batchnorm, resolve_batchnorm_mode
from moco_core.encoders import SUPPORTED_ARCHS, Encoder, HeadKind
from moco_core.mechanisms import ContrastiveModel, EndToEnd, MemoryBankModel, MoCo

Mechanism = Literal["moco", "end_to_end", "memory_bank"]
MECHANISMS: tuple[str, ...] = ("moco", "end_to_end", "memory_bank")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network and the contrastive task.

    Attributes:
        arch: torchvision backbone (resnet18 ... wide_resnet101_2).
        small_image_stem: 3x3 stride-1 stem, no max-pool (for 32-96 px images).
        head: ``linear`` (v1) or ``mlp`` (v2) projection head.
        dim: embedding width C.
        mechanism: ``moco``, ``end_to_end`` or ``memory_bank`` (the paper's Figure 3).
        queue_size: K; the queue length for ``moco``, negatives drawn per step for
            ``memory_bank``; unused by ``end_to_end`` (its negatives are the batch).
        temperature: InfoNCE temperature T.
        batchnorm: ``auto``, ``shuffle``, ``split``, ``sync`` or ``none`` (see ``moco_core.batchnorm``);
            ``auto`` is resolved when the model is built: ``shuffle`` in a process group of
            several ranks, ``split`` in a single process.
        bn_splits: sub-batches per batch for ``split`` BatchNorm.
        symmetric: also use the key view as query (``moco`` and ``end_to_end``).
        bank_momentum: memory-bank refresh momentum.
    """

    arch: str = "resnet50"
    small_image_stem: bool = False
    head: HeadKind = "mlp"
    dim: int = 128
    mechanism: Mechanism = "moco"
    queue_size: int = 65536
    temperature: float = 0.2
    batchnorm: BatchNormMode = "auto"
    bn_splits: int = 8
    symmetric: bool = False
    bank_momentum: float = 0.5

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        checks = [
            (self.arch in SUPPORTED_ARCHS, "arch", f"one of {', '.join(SUPPORTED_ARCHS)}"),
            (self.head in ("linear", "mlp"), "head", "'linear' or 'mlp'"),
            (self.dim >= 1, "dim", "a positive integer"),
            (self.mechanism in MECHANISMS, "mechanism", f"one of {', '.join(MECHANISMS)}"),
            (self.queue_size >= 1, "queue_size", "a positive integer"),
            (self.temperature > 0, "temperature", "positive"),
            (self.batchnorm in BATCHNORM_MODES, "batchnorm", f"one of {', '.join(BATCHNORM_MODES)}"),
            (self.bn_splits >= 1, "bn_splits", "a positive integer"),
            (0.0 <= self.bank_momentum <= 1.0, "bank_momentum", "in [0, 1]"),
            (
                not (self.symmetric and self.mechanism == "memory_bank"),
                "symmetric",
                "false with the memory_bank mechanism (it encodes one view only)",
            ),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ValueError(f"model.{field}={getattr(self, field)!r} is invalid: expected {expected}")


def build_model(config: ModelConfig, num_samples: int | None = None) -> ContrastiveModel:
    """Build the contrastive model that ``config`` describes (random initialisation, on the CPU).

    Args:
        config: the model configuration.
        num_samples: training-set size; required by the ``memory_bank`` mechanism only.
    """
    config.validate()
    batchnorm = resolve_batchnorm_mode(config.batchnorm)
    encoder = Encoder(config.arch, config.head, config.dim, config.small_image_stem)
    convert_batchnorm(encoder, batchnorm, config.bn_splits)
    if config.mechanism == "moco":
        return MoCo(encoder, config.queue_size, config.temperature, batchnorm, config.symmetric)
    if config.mechanism == "end_to_end":
        return EndToEnd(encoder, config.temperature, batchnorm, config.symmetric)
    if num_samples is None or num_samples < 1:
        raise ValueError("the memory_bank mechanism needs num_samples (the training-set size)")
    return MemoryBankModel(encoder, num_samples, config.queue_size, config.temperature, config.bank_momentum)
