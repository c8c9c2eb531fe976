"""An easy instance-discrimination task for CPU tests: fixed smooth random images (coarse
patterns that survive global pooling), views = image + pixel noise."""

from __future__ import annotations

import torch


def synthetic_views(num_images: int = 64, size: int = 16, seed: int = 0):
    """Yield ``(query_view, key_view, indices)`` batches forever from ``num_images`` fixed images."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_images, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def batches(batch_size: int):
        while True:
            indices = torch.randperm(num_images, generator=generator)[:batch_size]
            base = images[indices]
            yield (
                base + 0.3 * torch.randn(base.shape, generator=generator),
                base + 0.3 * torch.randn(base.shape, generator=generator),
                indices,
            )

    return batches


class TinyEncoder(torch.nn.Module):
    """A two-conv encoder with BatchNorm: learns the synthetic task in a few dozen CPU steps."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(128, dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(images), dim=1)
