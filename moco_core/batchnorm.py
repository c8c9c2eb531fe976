"""BatchNorm strategies that stop the model "cheating" through intra-batch statistics.

MoCo section 3.3: if the query and its positive key are normalised with the same batch
statistics, the pretext task leaks. The modes, selectable per run for ablation:

* ``shuffle`` -- Shuffling BN across processes: gather the key images from all ranks, permute
  them with a permutation drawn on rank 0, encode this rank's slice, then undo the permutation.
* ``split`` -- the single-process substitute of the official CIFAR-10 demo: every BatchNorm
  normalises over ``num_splits`` sub-batches, and the key batch is permuted locally so its
  sub-batches differ from the query's.
* ``sync`` -- SyncBatchNorm (global statistics; needs GPUs when distributed).
* ``none`` -- plain BatchNorm, no shuffling.
* ``auto`` -- ``shuffle`` when running in a process group of several ranks, else ``split``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moco_core import distributed

BatchNormMode = Literal["auto", "shuffle", "split", "sync", "none"]
BATCHNORM_MODES: tuple[str, ...] = ("auto", "shuffle", "split", "sync", "none")


def resolve_batchnorm_mode(mode: BatchNormMode) -> BatchNormMode:
    """``auto`` -> ``shuffle`` across several processes, ``split`` in one; other modes unchanged."""
    if mode != "auto":
        return mode
    return "shuffle" if distributed.is_distributed() else "split"


class _SplitBatchNormFunction(torch.autograd.Function):
    """Per-block batch norm written straight into one output tensor (and one input gradient), so
    no concatenation copy is made of every activation; the fused kernels do the arithmetic."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_means, running_vars, momentum, eps, num_splits):  # noqa: ANN001
        stat_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        means = torch.empty(num_splits, input.shape[1], dtype=stat_dtype, device=input.device)  # S x C
        inverse_stds = torch.empty_like(means)  # S x C
        output = torch.empty_like(input)  # keeps the memory format
        for index, (block, out) in enumerate(zip(input.chunk(num_splits), output.chunk(num_splits))):
            torch.ops.aten.native_batch_norm.out(
                block,
                weight,
                bias,
                None if running_means is None else running_means[index],
                None if running_vars is None else running_vars[index],
                True,
                momentum,
                eps,
                out=out,
                save_mean=means[index],
                save_invstd=inverse_stds[index],
            )
        ctx.save_for_backward(input, weight, means, inverse_stds)
        ctx.eps, ctx.num_splits = eps, num_splits
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001
        input, weight, means, inverse_stds = ctx.saved_tensors
        splits = ctx.num_splits
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = torch.empty_like(input) if needs_input else None
        grad_weights = means.new_empty(splits, input.shape[1], dtype=weight.dtype) if weight is not None else None
        grad_biases = torch.empty_like(grad_weights) if grad_weights is not None else None
        for index, (grad_block, block) in enumerate(zip(grad_output.chunk(splits), input.chunk(splits))):
            torch.ops.aten.native_batch_norm_backward.out(
                grad_block,
                block,
                weight,
                None,
                None,
                means[index],
                inverse_stds[index],
                True,
                ctx.eps,
                [needs_input, needs_weight, needs_bias],
                out0=grad_input.chunk(splits)[index] if needs_input else input.new_empty(0),
                out1=grad_weights[index] if grad_weights is not None else means.new_empty(0),
                out2=grad_biases[index] if grad_biases is not None else means.new_empty(0),
            )
        return (
            grad_input,
            grad_weights.sum(dim=0) if needs_weight else None,
            grad_biases.sum(dim=0) if needs_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


def _split_batch_norm_by_blocks(input, weight, bias, running_means, running_vars, momentum, eps, num_splits):  # noqa: ANN001
    """Per-block ``F.batch_norm`` and a concatenation: the reference form of split BatchNorm."""
    blocks = [
        F.batch_norm(
            block,
            None if running_means is None else running_means[index],
            None if running_vars is None else running_vars[index],
            weight,
            bias,
            True,
            momentum,
            eps,
        )
        for index, block in enumerate(input.chunk(num_splits))
    ]
    return torch.cat(blocks)


def _split_batch_norm_batched(input, weight, bias, running_mean, running_var, momentum, eps, num_splits):  # noqa: ANN001
    """Every sub-batch in one pass: the batch viewed as (S, N/S, C, H, W) (a view in both memory
    formats), per-(split, channel) statistics from one reduction, one fused scale-and-shift. A
    fixed number of kernels per layer whatever S is, where the per-block forms launch S of each
    (on a GPU the launches, not the arithmetic, are the cost; the official demo's reshape to
    (N/S, C*S, H, W) does the same for NCHW only), and ``torch.compile`` can trace it.
    Statistics in fp32 for half-precision inputs. ``running_mean``/``running_var`` (C,) move
    towards the average of the sub-batches' statistics, which is the average of per-block updates.
    """
    n, c, h, w = input.shape
    blocks = input.view(num_splits, n // num_splits, c, h, w)
    exact = blocks.float() if blocks.dtype in (torch.float16, torch.bfloat16) else blocks
    variance, mean = torch.var_mean(exact, dim=(1, 3, 4), unbiased=False, keepdim=True)  # S x 1 x C x 1 x 1
    scale = torch.rsqrt(variance + eps)
    if weight is not None:
        scale = scale * weight.view(1, 1, c, 1, 1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(1, 1, c, 1, 1)
    output = torch.addcmul(shift, exact, scale).to(input.dtype)
    if running_mean is not None and running_var is not None:
        count = blocks[0].numel() // c
        with torch.no_grad():
            running_mean.lerp_(mean.view(num_splits, c).mean(dim=0).to(running_mean.dtype), momentum)
            unbiased = variance.view(num_splits, c).mean(dim=0) * (count / max(count - 1, 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return output.reshape(n, c, h, w)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from ``num_splits`` equal sub-batches.

    The batch is cut into contiguous blocks (channels_last stays channels_last); each block is
    normalised with its own mean and variance. Running statistics are the average of the
    per-block updates, as in the official demo, and eval mode is plain BatchNorm. The state dict
    is identical to ``nn.BatchNorm2d``'s, so checkpoints load into stock torchvision models.

    Args:
        num_features: channels C.
        num_splits: sub-batches per batch; the batch size must be a multiple of it.

    Shape:
        (N, C, H, W) -> (N, C, H, W)
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[0] % self.num_splits:
            raise ValueError(
                f"split BatchNorm: batch size {input.shape[0]} is not a multiple of num_splits={self.num_splits}"
            )
        momentum = 0.1 if self.momentum is None else self.momentum
        running_mean, running_var = self.running_mean, self.running_var
        tracking = self.track_running_stats and running_mean is not None and running_var is not None
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if input.device.type != "cpu" or torch.compiler.is_compiling():
            stats = (running_mean, running_var) if tracking else (None, None)
            return _split_batch_norm_batched(input, self.weight, self.bias, *stats, momentum, self.eps, self.num_splits)
        # On a CPU, eager: the per-block fused kernels written into one output (measured fastest there).
        running_means = running_vars = None
        if tracking:
            running_means = running_mean.repeat(self.num_splits, 1)  # type: ignore[union-attr]  # S x C, per block
            running_vars = running_var.repeat(self.num_splits, 1)  # type: ignore[union-attr]  # S x C
        output = _SplitBatchNormFunction.apply(
            input, self.weight, self.bias, running_means, running_vars, momentum, self.eps, self.num_splits
        )
        if running_means is not None and running_vars is not None:
            with torch.no_grad():
                running_mean.copy_(running_means.mean(dim=0))  # type: ignore[union-attr]
                running_var.copy_(running_vars.mean(dim=0))  # type: ignore[union-attr]
        return output


def convert_batchnorm(module: nn.Module, mode: BatchNormMode, num_splits: int = 8) -> nn.Module:
    """Return ``module`` with its BatchNorm layers set up for ``mode`` (weights are kept).

    ``split`` swaps every BatchNorm2d for :class:`SplitBatchNorm2d`; ``sync`` for
    ``nn.SyncBatchNorm``; ``shuffle`` and ``none`` leave the layers alone.
    """
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm mode {mode!r}; choose one of {', '.join(BATCHNORM_MODES)}")
    mode = resolve_batchnorm_mode(mode)
    if mode == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if mode != "split":
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_batchnorm(child, mode, num_splits)
    return module


def _random_permutation(size: int, device: torch.device) -> torch.Tensor:
    permutation = torch.randperm(size, device=device)
    return distributed.broadcast_(permutation, src=0)


def encode_with_shuffled_batch(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    mode: BatchNormMode,
    differentiable: bool = False,
) -> torch.Tensor:
    """Encode ``images`` with the batch shuffled as ``mode`` requires; outputs keep input order.

    ``shuffle`` permutes across all ranks (every rank must pass the same batch size), ``split``
    within this process; ``sync`` and ``none`` encode the batch as it is. With ``differentiable``
    the un-shuffle keeps gradients (the end-to-end mechanism back-propagates through keys).

    Shape:
        images: (N, 3, H, W) -> (N, D)
    """
    mode = resolve_batchnorm_mode(mode)
    if mode == "split":
        permutation = torch.randperm(images.shape[0], device=images.device)
        encoded = encoder(images[permutation])
        return encoded[torch.argsort(permutation)]
    if mode != "shuffle":
        return encoder(images)
    local_batch, rank, world = images.shape[0], distributed.rank(), distributed.world_size()
    all_images = distributed.all_gather_concat(images)  # (world*N) x 3 x H x W
    permutation = _random_permutation(all_images.shape[0], images.device)
    encoded = encoder(all_images[permutation.view(world, local_batch)[rank]])  # N x D
    gather = distributed.all_gather_concat_with_grad if differentiable else distributed.all_gather_concat
    all_encoded = gather(encoded)  # (world*N) x D, in shuffled order
    inverse = torch.argsort(permutation)
    return all_encoded[inverse.view(world, local_batch)[rank]]
