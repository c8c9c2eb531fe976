"""Encoders: a torchvision ResNet-family backbone plus a projection head, L2-normalised output.

MoCo v1 uses a linear head; MoCo v2 (https://arxiv.org/abs/2003.04297) an MLP head
(hidden width = the backbone's feature width, ReLU). The backbone is a stock torchvision model
whose ``fc`` is replaced by ``Identity``, so ``Encoder.backbone.state_dict()`` loads straight into
``torchvision.models.<arch>()`` (strict=False, ``fc`` missing) for export and linear probing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

HeadKind = Literal["linear", "mlp"]

#: Backbones accepted by :func:`build_backbone` (torchvision ResNet / ResNeXt / Wide-ResNet).
SUPPORTED_ARCHS: tuple[str, ...] = tuple(
    sorted(name for name in tvm.list_models(module=tvm) if name.startswith(("resnet", "resnext", "wide_resnet")))
)


def build_backbone(arch: str, small_image_stem: bool = False) -> tuple[nn.Module, int]:
    """Build a randomly initialised torchvision backbone without its classifier.

    Args:
        arch: a name from :data:`SUPPORTED_ARCHS`, e.g. ``"resnet50"``.
        small_image_stem: replace the 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv and
            no pool, as is usual for 32-96 px images (CIFAR, STL-10).

    Returns:
        The backbone (its ``fc`` is ``Identity``) and its pooled feature width.

    Shape:
        backbone: (N, 3, H, W) -> (N, feature_dim)
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(SUPPORTED_ARCHS)}")
    backbone = tvm.get_model(arch, weights=None)
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if small_image_stem:
        stem_width = backbone.conv1.out_channels
        backbone.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return backbone, feature_dim


def build_projection_head(kind: HeadKind, in_dim: int, out_dim: int) -> nn.Module:
    """The projection head: ``linear`` (MoCo v1) or ``mlp`` (MoCo v2: in_dim-ReLU-out_dim).

    Shape:
        (N, in_dim) -> (N, out_dim)
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    raise ValueError(f"unknown projection head {kind!r}; choose 'linear' or 'mlp'")


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings.

    Args:
        arch: torchvision backbone name (see :data:`SUPPORTED_ARCHS`).
        head: ``"linear"`` (v1) or ``"mlp"`` (v2).
        dim: embedding width (128 in the paper).
        small_image_stem: see :func:`build_backbone`.

    Shape:
        forward: (N, 3, H, W) -> (N, dim), unit rows
        features: (N, 3, H, W) -> (N, feature_dim), the pooled backbone output
    """

    def __init__(self, arch: str = "resnet50", head: HeadKind = "mlp", dim: int = 128, small_image_stem: bool = False):
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be positive, got {dim}")
        self.backbone, self.feature_dim = build_backbone(arch, small_image_stem)
        self.head = build_projection_head(head, self.feature_dim, dim)
        self.dim = dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, the representation that downstream tasks use."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)
