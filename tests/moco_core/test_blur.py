"""The shared Gaussian blur: per-image uint8 (moco_core.blur) and the batched kernels (moco_core.photometric)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moco_core.blur import blur_radius, gaussian_blur_uint8, gaussian_taps
from moco_core.photometric import _gaussian_blur, gaussian_kernels


def _reference_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """An explicit 2-D float64 Gaussian to ceil(3 sigma), replicated edges, rounded. (H, W, C) -> (H, W, C)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel_1d = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = kernel / kernel.sum()
    channels = pixels.shape[2]
    image = torch.from_numpy(pixels.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    blurred = F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)[0].permute(1, 2, 0)
    return torch.floor(blurred + 0.5).clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.37, 2.0])
@pytest.mark.parametrize("shape", [(24, 40, 3), (31, 17, 3), (20, 20, 1), (5, 3, 3)])
def test_blur_matches_an_explicit_2d_gaussian(sigma, shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ours = gaussian_blur_uint8(pixels, sigma)
    reference = _reference_blur(pixels, sigma)
    assert ours.shape == pixels.shape and ours.dtype == np.uint8
    # float32 against float64 may round a value the other way, never further.
    assert np.abs(ours.astype(int) - reference).max() <= 1
    assert (ours != reference).mean() < 0.01


def test_blur_of_a_grey_image_and_its_guarantees():
    pixels = np.random.default_rng(1).integers(0, 256, (30, 22), dtype=np.uint8)
    pixels.setflags(write=False)  # PIL hands out read-only arrays
    ours = gaussian_blur_uint8(pixels, 1.2)
    assert ours.shape == (30, 22)
    assert np.abs(ours.astype(int) - _reference_blur(pixels[:, :, None], 1.2)[:, :, 0]).max() <= 1
    assert ours.std() < pixels.std() / 2  # noise is smoothed
    flat = np.full((16, 16, 3), 173, dtype=np.uint8)
    assert np.array_equal(gaussian_blur_uint8(flat, 2.0), flat)  # replicated edges keep a flat image flat


def test_kernels_are_normalised_and_truncated_per_sigma():
    sigma = torch.tensor([0.1, 0.7, 2.0], dtype=torch.float64)
    kernels = gaussian_kernels(sigma)
    largest = blur_radius(2.0)
    assert kernels.shape == (3, 2 * largest + 1)
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(kernels, kernels.flip(1))
    for row, value in zip(kernels, sigma.tolist()):
        radius = blur_radius(value)
        outside = torch.cat([row[: largest - radius], row[largest + radius + 1 :]])
        assert torch.all(outside == 0)
        # The batched kernels are the per-image taps, zero-padded.
        np.testing.assert_allclose(row[largest - radius : largest + radius + 1].numpy(), gaussian_taps(value))


def test_per_image_and_batched_blurs_agree():
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 18, 26, 3), dtype=torch.uint8, generator=generator)
    sigma = torch.tensor([0.3, 0.9, 1.6, 2.0])
    batched = _gaussian_blur(images.permute(0, 3, 1, 2).float(), gaussian_kernels(sigma))
    batched = torch.floor(batched + 0.5).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    for index, value in enumerate(sigma.tolist()):
        per_image = gaussian_blur_uint8(images[index].numpy(), value)
        assert np.abs(per_image.astype(int) - batched[index]).max() <= 1
