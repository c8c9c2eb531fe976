"""The shared blur: per-image uint8 (moco_core.blur) and the batched kernels (moco_core.photometric).

The kernel is the discrete Gaussian exp(-t) I_n(t), t = sigma^2, truncated at blur_radius(sigma)
and renormalised; its variance must be sigma^2 for every sigma MoCo v2 draws (0.1 to 2).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moco_core.blur import (
    _gaussian_blur_float32,
    blur_radius,
    discrete_gaussian_kernels,
    gaussian_blur_uint8,
    gaussian_taps,
)
from moco_core.photometric import _gaussian_blur, gaussian_kernels

special = pytest.importorskip("scipy.special")

#: |variance / sigma^2 - 1| allowed: truncating the kernel loses under 0.05% in [0.1, 2].
VARIANCE_TOLERANCE = 1e-3
SIGMAS = np.round(np.linspace(0.1, 2.0, 39), 6).tolist()  # every 0.05


def _variance(kernel: np.ndarray) -> float:
    offsets = np.arange(len(kernel)) - len(kernel) // 2
    return float((kernel * offsets**2).sum() / kernel.sum())


def _reference_taps(sigma: float) -> np.ndarray:
    """scipy's exponentially scaled Bessel functions, exp(-t) I_n(t), to the same radius, renormalised."""
    radius = blur_radius(sigma)
    taps = special.ive(np.abs(np.arange(-radius, radius + 1)), sigma**2)
    return taps / taps.sum()


def _reference_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """An explicit 2-D float64 convolution with the reference taps, replicated edges, rounded.

    Shape:
        pixels: (H, W, C) -> (H, W, C)
    """
    taps = torch.from_numpy(_reference_taps(sigma))
    radius = len(taps) // 2
    kernel = torch.outer(taps, taps)
    channels = pixels.shape[2]
    image = torch.from_numpy(pixels.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    blurred = F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)[0].permute(1, 2, 0)
    return torch.floor(blurred + 0.5).clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("sigma", SIGMAS)
def test_kernel_variance_is_sigma_squared(sigma):
    taps = gaussian_taps(sigma)
    assert len(taps) == 2 * blur_radius(sigma) + 1
    assert abs(taps.sum() - 1) < 1e-12 and np.array_equal(taps, taps[::-1])
    assert abs(_variance(taps) / sigma**2 - 1) < VARIANCE_TOLERANCE
    np.testing.assert_allclose(taps, _reference_taps(sigma), rtol=1e-12, atol=1e-15)


def test_sampling_the_gaussian_would_fail_the_variance_check():
    """What the kernel replaces: the Gaussian sampled at integer taps has variance ~0 at sigma 0.1."""
    for sigma, sampled_sigma in [(0.1, 0.0), (0.4, 0.284)]:
        offsets = np.arange(-3, 4)
        sampled = np.exp(-0.5 * (offsets / sigma) ** 2)
        assert abs(np.sqrt(_variance(sampled)) - sampled_sigma) < 1e-3
        assert abs(np.sqrt(_variance(gaussian_taps(sigma))) - sigma) < 1e-3


@pytest.mark.parametrize("sigma", [0.1, 0.25, 0.4, 0.75, 1.3, 2.0])
def test_a_blurred_impulse_has_variance_sigma_squared_on_both_paths(sigma):
    side, centre = 41, 20
    impulse = np.zeros((side, side, 3), dtype=np.uint8)
    impulse[centre, centre] = 255
    per_image = _gaussian_blur_float32(impulse, sigma).reshape(side, side, 3).astype(np.float64)
    batched = _gaussian_blur(
        torch.from_numpy(impulse).permute(2, 0, 1)[None].double(), gaussian_kernels(torch.tensor([sigma]).double())
    )[0].permute(1, 2, 0)
    offsets = np.arange(side) - centre
    for blurred in (per_image, batched.numpy()):
        channel = blurred[:, :, 0]
        assert abs(channel.sum() - 255) < 1e-3  # nothing lost at the edges
        for profile in (channel.sum(axis=0), channel.sum(axis=1)):  # along x, along y
            variance = (profile * offsets**2).sum() / profile.sum()
            assert abs(variance / sigma**2 - 1) < VARIANCE_TOLERANCE, (sigma, variance)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.37, 2.0])
@pytest.mark.parametrize("shape", [(24, 40, 3), (31, 17, 3), (20, 20, 1), (5, 3, 3)])
def test_blur_matches_an_explicit_2d_convolution(sigma, shape):
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


def test_batched_kernels_are_the_per_image_taps_zero_padded():
    sigma = torch.tensor([0.1, 0.7, 2.0, 0.33], dtype=torch.float64)
    kernels = gaussian_kernels(sigma)
    largest = blur_radius(2.0)
    assert kernels.shape == (4, 2 * largest + 1) and kernels.dtype == torch.float64
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(4, dtype=torch.float64))
    for row, value in zip(kernels, sigma.tolist()):
        radius = blur_radius(value)
        outside = torch.cat([row[: largest - radius], row[largest + radius + 1 :]])
        assert torch.all(outside == 0)
        own_taps = row[largest - radius : largest + radius + 1].numpy()
        np.testing.assert_allclose(own_taps, gaussian_taps(value), rtol=1e-14)
    assert gaussian_kernels(sigma.float()).dtype == torch.float32


def test_per_image_and_batched_blurs_agree():
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 18, 26, 3), dtype=torch.uint8, generator=generator)
    sigma = torch.tensor([0.3, 0.9, 1.6, 2.0])
    batched = _gaussian_blur(images.permute(0, 3, 1, 2).float(), gaussian_kernels(sigma))
    batched = torch.floor(batched + 0.5).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    for index, value in enumerate(sigma.tolist()):
        per_image = gaussian_blur_uint8(images[index].numpy(), value)
        assert np.abs(per_image.astype(int) - batched[index]).max() <= 1


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_sigmas_are_refused(bad):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_taps(bad)
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian_kernels(np.array([1.0, bad]))
