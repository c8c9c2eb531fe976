"""Collectives with single-process fallbacks.

Every function works whether or not ``torch.distributed`` is initialised: without a process
group ``rank()`` is 0, ``world_size()`` is 1 and gathers return their input, so the algorithm
code never branches on "am I distributed".
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group with more than one process exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order, without gradients.

    All ranks must pass tensors of the same shape.

    Shape:
        (N, ...) -> (world_size * N, ...)
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


class _AllGatherConcat(torch.autograd.Function):
    """Concatenation of every rank's tensor; the backward sums each slice's gradient over ranks
    (every rank's loss used every slice) and hands each rank its own."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.batch = tensor.shape[0]
        return all_gather_concat(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_concat_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_concat`, but gradients flow back to each rank's own slice.

    Used by the end-to-end mechanism, whose negatives are the keys of the whole global batch.
    """
    if not is_distributed():
        return tensor
    return _AllGatherConcat.apply(tensor)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value (no-op when not distributed)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, returned as a new tensor (a copy when not distributed)."""
    result = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= world_size()
    return result
