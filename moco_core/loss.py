"""InfoNCE (https://arxiv.org/abs/1807.03748) as MoCo uses it, and its pretext accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ContrastiveLoss:
    """A contrastive loss and the pretext accuracy of its logits.

    Attributes:
        loss: scalar to back-propagate.
        pretext_top1: percentage of queries whose positive key scores highest among all
            candidates (positive + negatives); a 0-dim tensor (no host sync until read).
        pretext_top5: the same for the top 5.
    """

    loss: torch.Tensor
    pretext_top1: torch.Tensor
    pretext_top5: torch.Tensor


@torch.no_grad()
def _pretext_accuracy(
    positive_logits: torch.Tensor, candidate_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1/top-5 (percent): the positive is a top-k hit when fewer than k candidates score
    strictly above it (ties count in its favour).

    Shape:
        positive_logits: (N,); candidate_logits: (N, M) -> two 0-dim tensors
    """
    top = candidate_logits.topk(min(5, candidate_logits.shape[1]), dim=1).values.float()  # N x min(5, M)
    positive_logits = positive_logits.float()
    top1 = (positive_logits >= top[:, 0]).float().mean() * 100.0
    if top.shape[1] < 5:
        return top1, torch.full_like(top1, 100.0)
    return top1, (positive_logits >= top[:, 4]).float().mean() * 100.0


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class _SharedNegativesInfoNCE(torch.autograd.Function):
    """InfoNCE against shared negatives with one pass-light N x K working buffer.

    The N x K logits are the largest tensor of a MoCo step (256 x 65536). Autograd through
    ``logsumexp`` would keep several copies and make several passes over them; here the logits
    buffer is turned in place into ``exp(l - max)``, reused for the partition function, the
    backward matmul and nothing else. Gradients flow to the (scaled) queries only.
    """

    @staticmethod
    def forward(ctx, scaled_query, positive_key, negative_keys, matmul_dtype):  # noqa: ANN001
        positive = (scaled_query * positive_key).sum(dim=1)  # N, the statistics' dtype (fp32 or fp64)
        negative_keys = negative_keys.to(matmul_dtype)
        shifted = scaled_query.to(matmul_dtype) @ negative_keys.T  # N x K, becomes exp(l- - max)
        top1, top5 = _pretext_accuracy(positive, shifted)
        row_max = torch.maximum(shifted.amax(dim=1).to(positive.dtype), positive)  # N
        shifted.sub_(row_max[:, None].to(shifted.dtype)).exp_()
        positive_term = torch.exp(positive - row_max)  # N
        partition = shifted.sum(dim=1, dtype=positive.dtype) + positive_term  # N
        loss = (row_max + partition.log() - positive).mean()
        ctx.save_for_backward(positive_key, negative_keys, shifted, positive_term, partition)
        ctx.mark_non_differentiable(top1, top5)
        return loss, top1, top5

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_top1, _grad_top5):  # noqa: ANN001
        positive_key, negative_keys, shifted, positive_term, partition = ctx.saved_tensors
        weight = grad_loss / shifted.shape[0]
        # d loss / d query_i = (sum_j softmax_ij * neg_j + (softmax_i+ - 1) * k+_i) / N
        negative_part = (shifted @ negative_keys).to(partition.dtype) * (weight / partition)[:, None]  # N x C
        positive_part = positive_key * ((positive_term / partition - 1.0) * weight)[:, None]  # N x C
        return negative_part + positive_part, None, None, None


def info_nce(
    query: torch.Tensor, positive_key: torch.Tensor, negative_keys: torch.Tensor, temperature: float
) -> ContrastiveLoss:
    """InfoNCE with one positive per query and negatives shared by all queries (MoCo, memory bank).

    ``logits = [q . k+, q . negatives] / T`` with target class 0 and cross entropy; its
    random-guess level is ``ln(K + 1)``. The keys get no gradient (MoCo's keys come from the
    momentum encoder, the memory bank's from the bank). The softmax statistics are fp32; under
    autocast the two N x K matmuls run in the autocast dtype.

    Args:
        query: L2-normalised queries.
        positive_key: the matching keys.
        negative_keys: K negatives shared by every query.
        temperature: T.

    Shape:
        query, positive_key: (N, C); negative_keys: (K, C) -> scalar loss
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if positive_key.requires_grad or negative_keys.requires_grad:
        raise ValueError("info_nce gives keys no gradient; pass them detached (see in_batch_info_nce for end-to-end)")
    dtype = torch.promote_types(query.dtype, torch.float32)
    matmul_dtype = _autocast_dtype(query.device) or dtype
    with torch.autocast(device_type=query.device.type, enabled=False):
        scaled_query = query.to(dtype) / temperature  # N x C; scaling here spares a pass over N x K
        loss, top1, top5 = _SharedNegativesInfoNCE.apply(
            scaled_query, positive_key.to(dtype), negative_keys, matmul_dtype
        )
    return ContrastiveLoss(loss, top1, top5)


def in_batch_info_nce(
    query: torch.Tensor, keys: torch.Tensor, temperature: float, first_positive: int = 0
) -> ContrastiveLoss:
    """InfoNCE whose negatives are the other keys of the batch (the end-to-end mechanism).

    Query ``i`` is positive with ``keys[first_positive + i]``; every other row of ``keys`` is a
    negative. With keys gathered from all ranks, ``first_positive`` is this rank's offset.

    Shape:
        query: (N, C); keys: (M, C), M >= first_positive + N -> scalar loss
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = query.to(dtype) @ keys.to(dtype).T / temperature  # N x M
        targets = torch.arange(query.shape[0], device=query.device) + first_positive
        loss = F.cross_entropy(logits, targets)
    top1, top5 = _pretext_accuracy(logits.gather(1, targets[:, None]).squeeze(1), logits)
    return ContrastiveLoss(loss, top1, top5)
