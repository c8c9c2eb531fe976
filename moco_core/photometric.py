"""The photometric part of the MoCo augmentation batched in torch, on the training device.

When ``AugmentConfig.photometric == "device"`` the ingest only decodes, crops, resizes and flips
(:class:`~moco_core.augment.TwoViewTransform`); colour jitter, grayscale and blur then run here on
whole uint8 batches, vectorised over images. :func:`prepare_model_input` is the one call the
training loop makes either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moco_core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_BRIGHTNESS,
    JITTER_CONTRAST,
    JITTER_HUE,
    JITTER_SATURATION,
    LUMA_WEIGHTS,
    AugmentConfig,
    PhotometricRecipe,
)
from moco_core.blur import discrete_gaussian_kernels


def _to_device(values: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (parameters, statistics) on ``device`` without waiting for the device.

    A plain copy from host memory to a GPU waits until every kernel queued before it has run,
    which would drain the GPU's queue once per copy; from pinned memory the copy is queued like
    a kernel instead.
    """
    if device.type == "cuda":
        return values.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return values.to(device=device, dtype=dtype)


def _channel_statistic(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel (R, G, B) values as a (1, 3, 1, 1) tensor on ``like``'s device and dtype."""
    return _to_device(torch.tensor(values, dtype=like.dtype), like.device).view(1, 3, 1, 1)


def _channels_first(views: torch.Tensor) -> torch.Tensor:
    """A (N, 3, H, W) view of a uint8 (N, 3, H, W) or (N, H, W, 3) batch, without copying.

    Dimension 1 wins when both it and the last are 3.
    """
    if views.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 batch of views, got {views.dtype}")
    if views.ndim != 4:
        raise ValueError(f"expected (N, 3, H, W) or (N, H, W, 3) views, got shape {tuple(views.shape)}")
    if views.shape[1] == 3:
        return views
    if views.shape[-1] == 3:
        return views.permute(0, 3, 1, 2)  # N x 3 x H x W, channels_last strides
    raise ValueError(f"expected (N, 3, H, W) or (N, H, W, 3) views, got shape {tuple(views.shape)}")


def _normalize_unit_(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: [0, 1] -> ``(images - mean) / std`` per channel."""
    return images.sub_(_channel_statistic(mean, images)).div_(_channel_statistic(std, images))


def normalize_batch(
    views: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 views -> float32 model input ``(views / 255 - mean) / std``, per channel.

    Use it when the photometric part already ran on the CPU, and for evaluation views (with the
    training run's ``AugmentConfig.mean`` and ``std``). Runs on the input's device. An
    (N, H, W, 3) batch (how Ray Data stacks H x W x 3 rows) comes back channels_last without a
    layout copy; an (N, 3, H, W) batch keeps its memory format. The input is not modified.

    Args:
        views: uint8 RGB views.
        mean, std: per-channel (R, G, B) statistics of [0, 1] pixels; ImageNet's by default.
        out: a float32 (N, 3, H, W) tensor to write into and return (see :class:`InputBuffers`).

    Shape:
        views: (N, 3, H, W) or (N, H, W, 3) uint8 -> (N, 3, H, W) float32
    """
    channels_first = _channels_first(views)
    if out is None:
        out = torch.empty_like(channels_first, dtype=torch.float32)
    elif out.shape != channels_first.shape or out.dtype != torch.float32:
        raise ValueError(
            f"out must be float32 of shape {tuple(channels_first.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    scale = 1.0 / (_channel_statistic(std, out) * 255.0)
    shift = -_channel_statistic(mean, out) * 255.0 * scale
    out.copy_(channels_first)
    return torch.addcmul(shift, out, scale, out=out)


class InputBuffers:
    """Reused float32 outputs of :func:`prepare_model_input` for a stream of same-shaped batches.

    On a CPU a fresh output of a large batch (150 MB for 256 views of 224 px) is mapped from the
    OS and faulted in page by page, which took longer than the normalisation itself (130-190 ms
    against 50 ms per such batch on our 2-core VM; docs/BENCHMARKS.md). Each ``name`` keeps one
    buffer, overwritten by the next batch of that name: use a name per view that must be alive
    at the same time (``query``, ``key``). Elsewhere (GPUs have a caching allocator, and the
    batched photometric path makes its own tensors) this is plain :func:`prepare_model_input`.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def prepare(
        self, name: str, views: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if views.device.type != "cpu" or config.photometric == "device":
            return prepare_model_input(views, config, generator)
        layout = _channels_first(views)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != layout.shape or buffer.stride() != layout.stride():
            buffer = self._buffers[name] = torch.empty_like(layout, dtype=torch.float32)
        return normalize_batch(views, config.mean, config.std, out=buffer)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images. Shape: (M, 3, H, W) -> (M, 1, H, W)."""
    red, green, blue = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    return red.mul(LUMA_WEIGHTS[0]).add_(green, alpha=LUMA_WEIGHTS[1]).add_(blue, alpha=LUMA_WEIGHTS[2])


def _adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul(factor).clamp_(0.0, 1.0)


def _adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # M x 1 x 1 x 1
    return torch.lerp(mean.expand_as(images), images, factor).clamp_(0.0, 1.0)


def _adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.lerp(_grayscale(images).expand_as(images), images, factor).clamp_(0.0, 1.0)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns; saturation and value are kept.

    Shape:
        images: (M, 3, H, W) in [0, 1]; shift: (M, 1, 1, 1)
    """
    red, green, blue = images.unbind(1)
    max_channel, min_channel = images.amax(dim=1), images.amin(dim=1)  # M x H x W
    chroma = max_channel - min_channel
    inverse_chroma = 1.0 / chroma.clamp_min(1e-12)  # grey pixels: any hue, chroma 0 cancels it below
    hue_sextant = torch.where(
        max_channel == red,
        (green - blue) * inverse_chroma,
        torch.where(max_channel == green, (blue - red) * inverse_chroma + 2.0, (red - green) * inverse_chroma + 4.0),
    )
    hue_sextant = hue_sextant.unsqueeze(1) + 6.0 * shift  # M x 1 x H x W
    # HSV -> RGB: channel n (R=5, G=3, B=1) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    offsets = torch.arange(5.0, 0.0, -2.0, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(hue_sextant + offsets, 6.0)  # M x 3 x H x W
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return max_channel.unsqueeze(1) - chroma.unsqueeze(1) * weight


_JITTER_OPS = {
    JITTER_BRIGHTNESS: _adjust_brightness,
    JITTER_CONTRAST: _adjust_contrast,
    JITTER_SATURATION: _adjust_saturation,
    JITTER_HUE: _adjust_hue,
}


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """:mod:`moco_core.blur`'s kernels, one per sigma, zero-padded to the largest radius.

    The taps are :func:`moco_core.blur.discrete_gaussian_kernels`' float64 numbers (computed on the
    CPU, where the parameters are drawn), so the device path blurs with the per-image path's kernel.

    Shape:
        sigma: (M,) -> (M, 2 * blur_radius(sigma.max()) + 1)
    """
    kernels = discrete_gaussian_kernels(sigma.detach().to("cpu", torch.float64).numpy())
    return torch.from_numpy(kernels).to(device=sigma.device, dtype=sigma.dtype)


def _gaussian_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable per-image Gaussian blur with replicated edges (as PIL's blur extends edges).

    Shape:
        images: (M, C, H, W); kernels: (M, K) with K odd
    """
    count, channels, height, width = images.shape
    radius = kernels.shape[1] // 2
    weight = kernels.repeat_interleave(channels, dim=0)  # (M*C) x K
    # Each (image, channel) plane is its own group, so one grouped convolution blurs the batch.
    planes = F.pad(images.reshape(1, count * channels, height, width), (radius,) * 4, mode="replicate")
    planes = planes.contiguous(memory_format=torch.channels_last)
    planes = F.conv2d(planes, weight.view(-1, 1, 1, 2 * radius + 1), groups=count * channels)
    planes = F.conv2d(planes, weight.view(-1, 1, 2 * radius + 1, 1), groups=count * channels)
    return planes.reshape(count, channels, height, width)


@dataclass(frozen=True)
class BatchPhotometricParams:
    """Per-image photometric parameters of a batch, drawn on the CPU.

    Shape:
        jitter, grayscale, blur: (N,) bool; order: (N, 4) permutations of 0..3 (brightness,
        contrast, saturation, hue); factors: (N, 4) in that index order; blur_sigma: (N,)
    """

    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor


def sample_batch_photometric_params(
    count: int, recipe: PhotometricRecipe, generator: torch.Generator | None = None
) -> BatchPhotometricParams:
    """Draw ``count`` images' photometric parameters with torchvision's distributions (on the CPU)."""

    def uniform(low: float, high: float, shape: tuple[int, ...] = (count,)) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    brightness, contrast, saturation, hue = recipe.jitter_strength
    factors = torch.stack(
        [uniform(max(0.0, 1.0 - strength), 1.0 + strength) for strength in (brightness, contrast, saturation)]
        + [uniform(-hue, hue)],
        dim=1,
    )
    return BatchPhotometricParams(
        jitter=torch.rand(count, generator=generator) < recipe.jitter_probability,
        order=torch.rand(count, 4, generator=generator).argsort(dim=1),
        factors=factors,
        grayscale=torch.rand(count, generator=generator) < recipe.grayscale_probability,
        blur=torch.rand(count, generator=generator) < recipe.blur_probability,
        blur_sigma=uniform(*recipe.blur_sigma),
    )


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices of the True entries (found on the CPU, so no device sync), or None if there are none."""
    rows = mask.nonzero().squeeze(1)
    return _to_device(rows, device) if rows.numel() else None


def apply_batch_photometric(
    images: torch.Tensor, params: BatchPhotometricParams, recipe: PhotometricRecipe
) -> torch.Tensor:
    """Colour jitter, grayscale and blur, per image with its own parameters, in place.

    Each operation runs once per (position in the jitter order, operation) on the images that
    need it, so the Python loop is over operations, never over images.

    Shape:
        images: (N, 3, H, W) float in [0, 1]
    """
    device = images.device

    def grayscale_selected() -> None:
        rows = _rows(params.grayscale, device)
        if rows is not None:
            images[rows] = _grayscale(images[rows]).expand(-1, 3, -1, -1)

    if recipe.grayscale_before_jitter:
        grayscale_selected()
    for position in range(4):
        for op, adjust in _JITTER_OPS.items():
            selected = params.jitter & (params.order[:, position] == op)
            rows = _rows(selected, device)
            if rows is not None:
                factor = _to_device(params.factors[selected, op], device, images.dtype).view(-1, 1, 1, 1)
                images[rows] = adjust(images[rows], factor)
    if not recipe.grayscale_before_jitter:
        grayscale_selected()
    rows = _rows(params.blur, device)
    if rows is not None:
        kernels = _to_device(gaussian_kernels(params.blur_sigma[params.blur]), device, images.dtype)
        images[rows] = _gaussian_blur(images[rows], kernels)
    return images


def photometric_batch(
    views: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The photometric part of ``config.recipe`` on a batch of cropped views, on their device.

    Each image gets its own random parameters (torchvision's distributions; the hue shift is the
    continuous HSV rotation of torchvision's tensor path). Blur is :mod:`moco_core.blur`'s
    discrete Gaussian. Returns model input, exactly like :func:`normalize_batch`: float32,
    normalised with ``config.mean`` and ``config.std``, channels_last when the input is
    (N, H, W, 3). The input is not modified.

    Args:
        views: uint8 views that were only cropped, resized and flipped.
        config: the augmentation (its ``recipe`` picks the operations, ``mean`` / ``std`` the
            normalisation).
        generator: a CPU generator for the parameters (a few numbers per image are drawn on the
            CPU and moved to the device), for reproducibility; None uses torch's global one.

    Shape:
        views: (N, 3, H, W) or (N, H, W, 3) uint8 -> (N, 3, H, W) float32
    """
    images = _channels_first(views).to(torch.float32).div_(255.0)
    recipe = config.photometric_recipe
    params = sample_batch_photometric_params(images.shape[0], recipe, generator)
    return _normalize_unit_(apply_batch_photometric(images, params, recipe), config.mean, config.std)


def prepare_model_input(
    views: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 views from :class:`TwoViewTransform` -> float32 model input, normalised with
    ``config.mean`` and ``config.std``.

    Runs :func:`photometric_batch` when ``config.photometric == "device"``, else
    :func:`normalize_batch`; the training loop calls this and need not know where the
    photometric part ran.

    Shape:
        views: (N, 3, H, W) or (N, H, W, 3) uint8 -> (N, 3, H, W) float32
    """
    if config.photometric == "device":
        return photometric_batch(views, config, generator)
    return normalize_batch(views, config.mean, config.std)
