"""A single-process training step, usable without Ray, and the settings it runs under."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from moco_core.loss import ContrastiveLoss
from moco_core.mechanisms import ContrastiveModel


def _cpu_has_fast_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


@dataclass(frozen=True)
class ComputeSettings:
    """Mixed precision and memory layout for the training step.

    Attributes:
        autocast_dtype: ``torch.bfloat16`` to run under autocast, or ``None`` for fp32.
        channels_last: store activations NHWC (faster convolutions on GPUs and oneDNN CPUs).
    """

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def precision(self) -> str:
        """``bf16`` or ``fp32``: what a step trains in, for logs, summaries and run tags."""
        return "bf16" if self.autocast_dtype is not None else "fp32"

    @classmethod
    def for_device(cls, device: torch.device | str) -> ComputeSettings:
        """bf16 + channels_last where the device runs bf16 natively (recent GPUs, AVX512-BF16/AMX
        CPUs), otherwise fp32 with channels_last."""
        device = torch.device(device)
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        elif device.type == "cpu":
            bf16 = _cpu_has_fast_bf16()
        else:
            bf16 = False
        return cls(autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=True)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the layout the model expects."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def forward_backward_seconds(
    encoder: nn.Module,
    images: torch.Tensor,
    settings: ComputeSettings,
    repeats: int = 2,
    give_up_after: float | None = None,
) -> float:
    """Fastest of ``repeats`` timed forward + backward passes of ``encoder`` on ``images`` under
    ``settings``, after one untimed pass; the untimed pass's time alone when it already took
    longer than ``give_up_after`` seconds (a clearly slower candidate is not timed further).

    Used to pick the precision that is faster on a device for a model and input size (on a CPU
    without fast bf16 kernels, bf16 autocast can be 10x slower than fp32). Leaves gradients on
    ``encoder``: probe a copy.

    Shape:
        images: (N, 3, H, W) float
    """
    device = images.device
    images = settings.prepare(images)

    def one_pass() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with settings.autocast(device):
            output = encoder(images)
        output.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = one_pass()
    if give_up_after is not None and first > give_up_after:
        return first
    return min(one_pass() for _ in range(repeats))


def compile_encoders(model: ContrastiveModel, backend: str = "inductor") -> None:
    """``torch.compile`` the query encoder and, where the mechanism has one, the momentum encoder,
    in place (``nn.Module.compile``): state-dict keys, the momentum update, the queue and
    checkpoints are unchanged. The first steps pay the compilation (over a minute for a ResNet-50
    on a GPU)."""
    for name in ("query_encoder", "momentum_encoder"):
        encoder = getattr(model, name, None)
        if isinstance(encoder, nn.Module):
            encoder.compile(backend=backend)


def build_optimizer(model: nn.Module, weight_decay: float = 1e-4, sgd_momentum: float = 0.9) -> torch.optim.SGD:
    """SGD over the trainable parameters (the query encoder), as in the paper.

    The learning rate is set per step by :func:`train_step`; weight decay applies to every
    parameter, as in the official code.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=0.0, momentum=sgd_momentum, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    model: ContrastiveModel,
    optimizer: torch.optim.Optimizer,
    query_view: torch.Tensor,
    key_view: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    sample_indices: torch.Tensor | None = None,
    settings: ComputeSettings = ComputeSettings(),
) -> ContrastiveLoss:
    """One optimisation step: set lr, forward both views (momentum update, keys, loss, enqueue),
    backward, SGD step. The device is the one the views are on.

    Args:
        model: a :class:`~moco_core.mechanisms.ContrastiveModel` on the views' device. With
            ``settings.channels_last`` it should already be ``.to(memory_format=channels_last)``.
        optimizer: from :func:`build_optimizer`.
        query_view, key_view: normalised float images.
        lr: learning rate for this step (from a schedule).
        momentum: encoder momentum m for this step (from a schedule).
        sample_indices: dataset indices (memory bank only).
        settings: mixed precision and layout.

    Returns:
        The step's loss and pretext accuracies, detached (reading them syncs the device).

    Shape:
        query_view, key_view: (N, 3, H, W)
    """
    set_learning_rate(optimizer, lr)
    query_view, key_view = settings.prepare(query_view), settings.prepare(key_view)
    with settings.autocast(query_view.device):
        result = model(query_view, key_view, momentum=momentum, sample_indices=sample_indices)
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    optimizer.step()
    return ContrastiveLoss(result.loss.detach(), result.pretext_top1, result.pretext_top5)
