"""The dictionary of negative keys: a fixed-size FIFO queue stored as module buffers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """K x C buffer of L2-normalised keys plus a write pointer, both saved in ``state_dict``.

    Unlike the official code, the enqueued batch need not divide K: writes wrap around the end
    of the buffer. A batch larger than K keeps its newest K keys. Initialised with random unit
    vectors, as in the official code, so it can be used from the first step.

    Args:
        size: K, the number of keys.
        dim: C, the key width.

    Shape:
        keys: (K, C)
    """

    keys: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got size={size} dim={dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, new_keys: torch.Tensor) -> None:
        """Overwrite the oldest keys with ``new_keys`` (already gathered from all ranks).

        Shape:
            new_keys: (N, C), any N >= 1
        """
        if new_keys.ndim != 2 or new_keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"expected keys of shape (N, {self.keys.shape[1]}), got {tuple(new_keys.shape)}")
        size = self.size
        if new_keys.shape[0] > size:
            # Keep the newest K, written so the pointer still advances by N mod K.
            start = new_keys.shape[0] - size
            new_keys, offset = new_keys[start:], start
        else:
            offset = 0
        count = new_keys.shape[0]
        # The pointer stays a device tensor: reading it on the host would wait for the device every step.
        first = (self.pointer + offset) % size
        slots = (first + torch.arange(count, device=self.keys.device)) % size
        self.keys.index_copy_(0, slots, new_keys.to(self.keys.dtype))
        self.pointer.copy_((first + count) % size)
