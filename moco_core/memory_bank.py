"""The memory bank of Wu et al. (https://arxiv.org/abs/1805.01978): one feature per training sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """N x C buffer of L2-normalised features, one row per training sample, saved in ``state_dict``.

    Rows are refreshed with momentum from each sample's latest query feature; negatives are
    drawn uniformly from all rows (a draw may include the query's own row, with probability K/N).

    Args:
        num_samples: N, the number of training samples (indices run from 0 to N-1).
        dim: C, the feature width.

    Shape:
        features: (N, C)
    """

    features: torch.Tensor

    def __init__(self, num_samples: int, dim: int):
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ValueError(f"memory bank needs num_samples >= 1 and dim >= 1, got {num_samples}, {dim}")
        self.register_buffer("features", F.normalize(torch.randn(num_samples, dim), dim=1))

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise IndexError unless every index is a row of the bank. ``lookup`` and ``update`` do not
        check (it would read device memory on the host every step): check where the indices are
        still on the host, as the memory-bank mechanism does."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.features.shape[0]):
            raise IndexError(f"sample index out of range for a memory bank of {self.features.shape[0]} rows")

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored features of ``indices`` (a copy). Shape: (B,) -> (B, C)."""
        return self.features[indices]

    def sample(self, count: int, device: torch.device) -> torch.Tensor:
        """``count`` uniformly drawn rows (a copy). Shape: -> (count, C)."""
        rows = torch.randint(0, self.features.shape[0], (count,), device=device)
        return self.features[rows]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, new_features: torch.Tensor, momentum: float) -> None:
        """``row = normalize(m * row + (1 - m) * feature)`` for each index.

        Shape:
            indices: (B,); new_features: (B, C)
        """
        blended = momentum * self.features[indices] + (1.0 - momentum) * new_features.to(self.features.dtype)
        self.features.index_copy_(0, indices, F.normalize(blended, dim=1))
