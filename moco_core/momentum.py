"""The momentum (key) encoder: a gradient-free exponential moving average of the query encoder.

As in the official code, only parameters are averaged; buffers (BatchNorm running statistics)
are the momentum encoder's own, updated by its forward passes in train mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_momentum_copy(encoder: nn.Module) -> nn.Module:
    """A deep copy of ``encoder`` whose parameters never receive gradients."""
    momentum_encoder = copy.deepcopy(encoder)
    for parameter in momentum_encoder.parameters():
        parameter.requires_grad_(False)
    return momentum_encoder


@torch.no_grad()
def momentum_update(query_encoder: nn.Module, momentum_encoder: nn.Module, momentum: float) -> None:
    """``theta_k = m * theta_k + (1 - m) * theta_q`` for every parameter, in fused multi-tensor kernels.

    ``m`` is passed per call so that its schedule (constant, cosine-to-1) lives outside the model.
    m=0 copies the query weights exactly; m=1 leaves the momentum encoder exactly unchanged.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    momentum_params: list[torch.Tensor] = list(momentum_encoder.parameters())
    query_params: list[torch.Tensor] = list(query_encoder.parameters())
    if len(momentum_params) != len(query_params):
        raise ValueError("query and momentum encoders have different parameter lists")
    # lerp(k, q, w) = k + w * (q - k); w = 1 - m is exact at both ends.
    torch._foreach_lerp_(momentum_params, query_params, 1.0 - momentum)
