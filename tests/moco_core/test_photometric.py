"""The batched photometric path (moco_core.photometric) against torchvision, per image."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from moco_core.augment import IMAGENET_MEAN, IMAGENET_STD, PHOTOMETRIC_RECIPES, AugmentConfig
from moco_core.blur import blur_radius
from moco_core.photometric import (
    BatchPhotometricParams,
    apply_batch_photometric,
    normalize_batch,
    photometric_batch,
    prepare_model_input,
    sample_batch_photometric_params,
)

_TORCHVISION_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _unnormalize(images: torch.Tensor) -> torch.Tensor:
    return images * STD.to(images.device) + MEAN.to(images.device)


def _colourful_batch(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("channels_last_input", [True, False])
def test_photometric_batch_returns_normalised_float_on_the_input_device(recipe, channels_last_input):
    views = _colourful_batch(16, size=24)
    if not channels_last_input:
        views = views.permute(0, 3, 1, 2).contiguous()
    original = views.clone()
    output = photometric_batch(views, AugmentConfig(recipe=recipe), torch.Generator().manual_seed(0))
    assert output.shape == (16, 3, 24, 24)
    assert output.dtype == torch.float32 and output.device == views.device
    assert output.is_contiguous(memory_format=torch.channels_last) == channels_last_input
    assert torch.isfinite(output).all()
    unit = _unnormalize(output)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    torch.testing.assert_close(views, original)  # the input is not modified


def test_photometric_batch_is_reproducible_with_a_generator():
    views, config = _colourful_batch(8), AugmentConfig()
    first = photometric_batch(views, config, torch.Generator().manual_seed(1))
    again = photometric_batch(views, config, torch.Generator().manual_seed(1))
    other = photometric_batch(views, config, torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_photometric_batch_greys_about_a_fifth_of_the_images(recipe):
    output = _unnormalize(photometric_batch(_colourful_batch(2000), AugmentConfig(recipe=recipe), None))
    channel_spread = (output.amax(dim=1) - output.amin(dim=1)).amax(dim=(1, 2))  # N
    grey_fraction = (channel_spread < 1e-4).float().mean().item()
    assert 0.16 < grey_fraction < 0.24


def test_sampled_batch_parameters_follow_the_recipe():
    for recipe in PHOTOMETRIC_RECIPES.values():
        params = sample_batch_photometric_params(20000, recipe, torch.Generator().manual_seed(0))
        assert params.jitter.float().mean().item() == pytest.approx(recipe.jitter_probability, abs=0.02)
        assert params.grayscale.float().mean().item() == pytest.approx(recipe.grayscale_probability, abs=0.02)
        assert params.blur.float().mean().item() == pytest.approx(recipe.blur_probability, abs=0.02)
        assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(20000, 4))
        for op, strength in enumerate(recipe.jitter_strength):
            low, high = (-strength, strength) if op == 3 else (max(0.0, 1 - strength), 1 + strength)
            factors = params.factors[:, op]
            assert low <= factors.min().item() and factors.max().item() <= high
            assert factors.mean().item() == pytest.approx((low + high) / 2, abs=0.01)
        sigma = params.blur_sigma
        assert recipe.blur_sigma[0] <= sigma.min().item() and sigma.max().item() <= recipe.blur_sigma[1]


def _reference_gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """An explicit 2-D discrete Gaussian (scipy's exp(-t) I_n(t), t = sigma^2) to blur_radius(sigma),
    renormalised, replicated edges. Shape: (3, H, W) -> (3, H, W)."""
    special = pytest.importorskip("scipy.special")
    radius = blur_radius(sigma)
    kernel_1d = torch.from_numpy(special.ive(np.abs(np.arange(-radius, radius + 1)), sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    padded = F.pad(image.unsqueeze(0), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(3, 1, -1, -1), groups=3).squeeze(0)


@pytest.mark.parametrize("recipe_name", ["v1", "v2"])
def test_batch_operations_match_torchvision_per_image(recipe_name):
    recipe = PHOTOMETRIC_RECIPES[recipe_name]
    count = 12
    images = _colourful_batch(count, size=20, seed=3).permute(0, 3, 1, 2).float() / 255
    params = sample_batch_photometric_params(count, recipe, torch.Generator().manual_seed(5))
    # Make every branch happen at least once.
    params = BatchPhotometricParams(
        jitter=params.jitter | (torch.arange(count) < 6),
        order=params.order,
        factors=params.factors,
        grayscale=torch.arange(count) % 4 == 1,
        blur=(torch.arange(count) % 2 == 0) if recipe.blur_probability > 0 else torch.zeros(count, dtype=torch.bool),
        blur_sigma=params.blur_sigma,
    )
    ours = apply_batch_photometric(images.clone(), params, recipe)
    for index in range(count):
        image = images[index]
        if params.grayscale[index] and recipe.grayscale_before_jitter:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.jitter[index]:
            factors = params.factors[index].tolist()
            for op in params.order[index].tolist():
                image = _TORCHVISION_JITTER[op](image, factors[op])
        if params.grayscale[index] and not recipe.grayscale_before_jitter:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur[index]:
            image = _reference_gaussian_blur(image, params.blur_sigma[index].item())
        torch.testing.assert_close(ours[index], image, atol=2e-5, rtol=0, msg=f"image {index}")


def test_normalize_batch_matches_the_formula_and_keeps_layout():
    views = _colourful_batch(4, size=10)
    original = views.clone()
    output = normalize_batch(views)
    expected = (views.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    torch.testing.assert_close(output, expected)
    assert output.dtype == torch.float32 and output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(views, original)
    torch.testing.assert_close(normalize_batch(views.permute(0, 3, 1, 2).contiguous()), expected)
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(views.float())
    with pytest.raises(ValueError, match="shape"):
        normalize_batch(views[..., :2])


def test_input_buffers_reuse_one_output_per_name_with_the_same_values():
    from moco_core.photometric import InputBuffers

    buffers, config = InputBuffers(), AugmentConfig(photometric="cpu")
    first, second = _colourful_batch(4, size=10), _colourful_batch(4, size=10).flip(0).contiguous()
    query = buffers.prepare("query", first, config)
    torch.testing.assert_close(query, normalize_batch(first))
    assert query.is_contiguous(memory_format=torch.channels_last)
    key = buffers.prepare("key", second, config)
    assert key.data_ptr() != query.data_ptr()  # both alive in one step
    again = buffers.prepare("query", second, config)
    assert again.data_ptr() == query.data_ptr()  # the next batch overwrites the last one of its name
    torch.testing.assert_close(again, normalize_batch(second))
    smaller = buffers.prepare("query", first[:2], config)  # a short last batch gets its own buffer
    torch.testing.assert_close(smaller, normalize_batch(first[:2]))
    on_device = buffers.prepare("query", first, AugmentConfig(photometric="device"), torch.Generator().manual_seed(1))
    assert on_device.data_ptr() != smaller.data_ptr()
    with pytest.raises(ValueError, match="out must be float32"):
        normalize_batch(first, out=torch.empty(3, 3, 10, 10))


def test_normalize_batch_takes_the_dataset_statistics():
    views = _colourful_batch(4, size=10)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    expected = (views.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normalize_batch(views, mean, std), expected)
    assert not torch.allclose(normalize_batch(views), expected)


@pytest.mark.parametrize("photometric", ["cpu", "device"])
def test_model_input_is_normalised_with_the_config_statistics(photometric):
    """Changing mean/std changes only the final affine map, on both placements."""
    views = _colourful_batch(16, size=12)
    imagenet = AugmentConfig(photometric=photometric)
    cifar = AugmentConfig(photometric=photometric, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    outputs = []
    for config in (imagenet, cifar):
        output = prepare_model_input(views, config, torch.Generator().manual_seed(7))
        outputs.append(output * torch.tensor(config.std).view(1, 3, 1, 1) + torch.tensor(config.mean).view(1, 3, 1, 1))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    assert not torch.allclose(
        prepare_model_input(views, imagenet, torch.Generator().manual_seed(7)),
        prepare_model_input(views, cifar, torch.Generator().manual_seed(7)),
    )


def test_prepare_model_input_dispatches_on_where_the_photometric_part_runs():
    views = _colourful_batch(6)
    torch.testing.assert_close(prepare_model_input(views, AugmentConfig(photometric="cpu")), normalize_batch(views))
    device_config = AugmentConfig(photometric="device")
    torch.testing.assert_close(
        prepare_model_input(views, device_config, torch.Generator().manual_seed(4)),
        photometric_batch(views, device_config, torch.Generator().manual_seed(4)),
    )
