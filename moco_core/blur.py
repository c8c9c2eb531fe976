"""MoCo v2's Gaussian blur, one definition for both photometric placements.

The kernel is the discrete Gaussian (Lindeberg, "Scale-space for discrete signals", IEEE TPAMI
1990), ``T(n; t) = exp(-t) I_n(t)`` with ``t = sigma ** 2`` and ``I_n`` the modified Bessel function
of the first kind: the discrete analogue of the Gaussian, whose variance is exactly ``sigma ** 2``
at every sigma. The obvious alternatives miss it where MoCo v2 draws sigma (0.1 to 2 pixels):

- sampling the continuous Gaussian at integer taps under-blurs small sigmas (effective sigma 0.0
  at 0.1, 0.09 at 0.3, 0.28 at 0.4): the taps next to the centre fall where the Gaussian is
  already ~0, while a kernel of variance sigma ** 2 needs them at ``sigma ** 2 / 2`` each;
- integrating the Gaussian over each pixel ``[n - 1/2, n + 1/2]`` (erf) adds the pixel's own
  variance, giving sigma ** 2 + 1/12 from sigma ~0.5 up, and still ~0 below 0.2.

PIL's ``GaussianBlur`` (the official code's) is an extended box filter built to have the same
variance, sigma ** 2. The discrete Gaussian's tails are heavier than the sampled Gaussian's, so
taps reach ``ceil(3.5 sigma) + 2`` each side, where truncation and renormalisation change the
variance by under 0.05% for sigma in [0.1, 2] (tests/moco_core/test_blur.py pins it at 0.1%).

Edges are replicated. The per-image CPU path (:func:`gaussian_blur_uint8`, numpy: the ingest
readers never import torch) and the batched device path
(:func:`moco_core.photometric.gaussian_kernels`) take their taps from
:func:`discrete_gaussian_kernels`, so a view is blurred alike wherever its photometric part runs.
``AugmentConfig.blur = "pil"`` calls PIL's blur instead, as the official main_moco.py does (the
same operation, not the same views: the official loader draws its parameters from Python's
``random``, ours come from numpy generators).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

#: Taps each side: ``ceil(BLUR_RADIUS_SIGMAS * sigma) + BLUR_RADIUS_EXTRA`` (see the module docstring).
BLUR_RADIUS_SIGMAS = 3.5
BLUR_RADIUS_EXTRA = 2
#: The continued fraction for ``I_n / I_(n-1)`` starts this far above the radius (plus ``t``);
#: ratios within the radius then agree with scipy's Bessel functions to 1e-15.
_CONTINUED_FRACTION_EXTRA = 10


def blur_radius(sigma: float) -> int:
    """Taps each side of the centre for a blur of standard deviation ``sigma``."""
    return math.ceil(BLUR_RADIUS_SIGMAS * sigma) + BLUR_RADIUS_EXTRA


def _half_kernel(scale: Any, radius: int, largest_scale: float) -> list[Any]:
    """``I_n(t) / I_0(t)`` for ``n = 0 .. radius``, ``t = scale`` (a float, or an array of them
    whose largest is ``largest_scale``).

    The ratios ``I_n / I_(n-1) = 1 / (2n / t + I_(n+1) / I_n)`` come from the continued fraction
    run down from far above the radius, so nothing overflows at any ``t``. The same arithmetic runs
    on Python floats (one sigma: the per-image path, a few microseconds) or on numpy arrays (a
    batch), so both paths compute the same numbers.
    """
    two_over_scale = 2.0 / scale
    ratio = 0.0 * scale
    ratios = []
    for n in range(radius + _CONTINUED_FRACTION_EXTRA + math.ceil(largest_scale), 0, -1):
        ratio = 1.0 / (n * two_over_scale + ratio)  # I_n / I_(n-1)
        if n <= radius:
            ratios.append(ratio)
    half = [1.0 + 0.0 * scale]
    for ratio in reversed(ratios):
        half.append(half[-1] * ratio)
    return half


def discrete_gaussian_kernels(sigmas: np.ndarray) -> np.ndarray:
    """The discrete Gaussian of each ``sigma``, truncated to its own radius and renormalised.

    Row ``i`` holds ``exp(-t) I_n(t)``, ``t = sigmas[i] ** 2``, for ``n = -R .. R`` with ``R`` the
    largest :func:`blur_radius`, divided by its sum; taps beyond the row's own radius are zero.
    The batched device path takes its kernels from here.

    Args:
        sigmas: standard deviations in pixels, each > 0.

    Returns:
        float64 kernels, each summing to 1.

    Shape:
        sigmas: (M,) -> (M, 2 * blur_radius(sigmas.max()) + 1)
    """
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if sigmas.size == 0 or not np.all(np.isfinite(sigmas)) or not np.all(sigmas > 0):
        raise ValueError(f"blur sigmas must be finite and > 0, got {sigmas.tolist()}")
    own_radius = np.array([blur_radius(float(sigma)) for sigma in sigmas])
    radius, largest = int(own_radius.max()), float(sigmas.max())
    half = np.stack(_half_kernel(sigmas**2, radius, largest**2), axis=1)  # M x (R+1): taps 0..R
    half[np.arange(radius + 1)[None, :] > own_radius[:, None]] = 0.0
    half /= (half[:, 0] + 2.0 * half[:, 1:].sum(axis=1))[:, None]
    return np.concatenate([half[:, :0:-1], half], axis=1)  # M x (2R+1), symmetric


def gaussian_taps(sigma: float) -> np.ndarray:
    """The 1-D kernel of one ``sigma``: a row of :func:`discrete_gaussian_kernels`, at its own radius.

    Shape:
        return: (2 * blur_radius(sigma) + 1,) float64
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"blur sigma must be finite and > 0, got {sigma}")
    half = np.array(_half_kernel(sigma**2, blur_radius(sigma), sigma**2))
    half /= half[0] + 2.0 * half[1:].sum()
    return np.concatenate([half[:0:-1], half])


_scratch = threading.local()


def _float32_buffer(slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``shape``, reusing this thread's buffer number ``slot``.

    Fresh megabyte-sized arrays cost a page fault per 4 KB on every call, which would take as long
    as the blur itself; kept buffers are already mapped.
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    if slot not in buffers or buffers[slot].size < size:
        buffers[slot] = np.empty(size, np.float32)
    return buffers[slot][:size].reshape(shape)


def _blur_along(padded: np.ndarray, taps: np.ndarray, step: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out`` = sum over t of ``taps[t]`` x ``padded`` shifted by ``t * step`` along its last axis.

    The kernel is symmetric, so each pair of taps costs one add and one scale.
    """
    length, radius = out.shape[-1], len(taps) // 2

    def shifted(tap: int) -> np.ndarray:
        return padded[..., tap * step : tap * step + length]

    np.multiply(shifted(radius), np.float32(taps[radius]), out=out)
    for offset in range(1, radius + 1):
        np.add(shifted(radius - offset), shifted(radius + offset), out=scratch)
        scratch *= np.float32(taps[radius + offset])
        out += scratch


def _gaussian_blur_float32(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """The blur before rounding, in this thread's scratch buffer (valid until the next call).

    Two separable passes of shifted multiply-adds in float32 with replicated borders.

    Shape:
        pixels: (H, W) or (H, W, C) uint8 -> (1, H * W * C) float32
    """
    height, width = pixels.shape[:2]
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    taps = gaussian_taps(sigma)
    radius = len(taps) // 2
    row_length, border = width * channels, radius * channels
    rows = pixels.reshape(height, row_length)
    # Horizontal pass: pad each row with copies of its edge pixel, shift by whole pixels.
    padded = _float32_buffer(0, (height, row_length + 2 * border))
    padded[:, border : border + row_length] = rows
    padded[:, :border] = np.tile(rows[:, :channels], (1, radius))
    padded[:, border + row_length :] = np.tile(rows[:, -channels:], (1, radius))
    # Its result goes straight into the middle of a buffer padded with edge rows for the vertical pass.
    column_padded = _float32_buffer(1, (height + 2 * radius, row_length))
    horizontal = column_padded[radius : radius + height]
    scratch = _float32_buffer(2, (height, row_length))
    _blur_along(padded, taps, channels, horizontal, scratch)
    column_padded[:radius] = horizontal[:1]
    column_padded[radius + height :] = horizontal[-1:]
    blurred = _float32_buffer(3, (1, height * row_length))
    _blur_along(column_padded.reshape(1, -1), taps, row_length, blurred, scratch.reshape(1, -1))
    return blurred


def gaussian_blur_uint8(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Blur one uint8 image with the discrete Gaussian above, rounding back to uint8.

    Shape:
        pixels: (H, W) or (H, W, C) uint8 -> same shape, uint8
    """
    blurred = _gaussian_blur_float32(pixels, sigma)
    blurred += 0.5
    np.clip(blurred, 0.0, 255.0, out=blurred)
    return blurred.astype(np.uint8).reshape(pixels.shape)
