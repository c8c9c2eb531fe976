"""MoCo v2's Gaussian blur, one definition for both photometric placements.

A true Gaussian of standard deviation ``sigma`` (output pixels), truncated at ``ceil(3 sigma)``
taps each side and renormalised, with replicated edges: the blur SimCLR and MoCo v2 describe. The
per-image CPU path (:func:`gaussian_blur_uint8`, numpy: the ingest readers never import torch)
and the batched device path (:func:`moco_core.photometric.gaussian_kernels`) use the same
kernel, so a view is blurred alike wherever its photometric part runs.

The official main_moco.py calls PIL's ``GaussianBlur(radius=sigma)``, an extended-box
approximation of the same Gaussian that costs 3x more on a 224 px view;
``AugmentConfig.blur = "pil"`` keeps it for bit-for-bit parity with that code.
"""

from __future__ import annotations

import math
import threading

import numpy as np

#: Taps reach this many standard deviations each side (the rest of the mass is < 0.3%).
BLUR_TRUNCATE = 3.0


def blur_radius(sigma: float) -> int:
    """Taps each side of the centre for a Gaussian of standard deviation ``sigma``."""
    return max(1, math.ceil(BLUR_TRUNCATE * sigma))


def gaussian_taps(sigma: float) -> np.ndarray:
    """The normalised 1-D kernel, float64. Shape: (2 * blur_radius(sigma) + 1,)"""
    radius = blur_radius(sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return kernel / kernel.sum()


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


def gaussian_blur_uint8(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Blur one uint8 image with the Gaussian above, rounding back to uint8.

    Two separable passes of shifted multiply-adds in float32 with replicated borders: about 3x
    faster than PIL's box-approximated blur on a 224 px RGB view, on one core.

    Shape:
        pixels: (H, W) or (H, W, C) uint8 -> same shape, uint8
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
    blurred += 0.5
    np.clip(blurred, 0.0, 255.0, out=blurred)
    return blurred.astype(np.uint8).reshape(pixels.shape)
