import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_image
from torchvision.transforms import RandomResizedCrop

from moco_core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOMETRIC_RECIPES,
    AugmentConfig,
    CenterCropTransform,
    ColorJitterParams,
    CropBox,
    PhotometricParams,
    TwoViewTransform,
    ViewParams,
    _shift_hue_pil,
    apply_photometric_cpu,
    draft_reduction,
    render_view,
    sample_crop_box,
    sample_photometric_params,
)
from moco_core.blur import gaussian_blur_uint8
from moco_core.image_io import ImageDecodeError

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _encode(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427 RGB


@pytest.fixture(scope="module")
def small_jpeg(photo) -> bytes:
    return _encode(photo.crop((100, 50, 420, 290)), quality=90)  # 320 x 240


@pytest.fixture(scope="module")
def large_jpeg(photo) -> bytes:
    return _encode(photo.resize((1600, 1200), Image.Resampling.BICUBIC), quality=90)


def _unnormalize(images: torch.Tensor) -> torch.Tensor:
    return images * STD.to(images.device) + MEAN.to(images.device)


# --- configuration ---------------------------------------------------------------------------


def test_recipes_are_the_official_ones():
    v1, v2 = PHOTOMETRIC_RECIPES["v1"], PHOTOMETRIC_RECIPES["v2"]
    assert (v1.jitter_strength, v1.jitter_probability, v1.grayscale_probability) == ((0.4,) * 4, 1.0, 0.2)
    assert v1.grayscale_before_jitter and v1.blur_probability == 0.0
    assert (v2.jitter_strength, v2.jitter_probability, v2.grayscale_probability) == ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2)
    assert not v2.grayscale_before_jitter and (v2.blur_probability, v2.blur_sigma) == (0.5, (0.1, 2.0))


def test_default_config_is_valid_and_is_moco_v2():
    config = AugmentConfig()
    config.validate()
    assert (config.recipe, config.size, config.crop_scale, config.photometric) == ("v2", 224, (0.2, 1.0), "cpu")


@pytest.mark.parametrize(
    "field,value",
    [
        ("recipe", "v3"),
        ("size", 0),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.0, 1.0)),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("photometric", "gpu"),
        ("blur", "box"),
        ("mean", (0.5, 0.5)),
        ("mean", (0.5, float("nan"), 0.5)),
        ("std", (0.2, 0.0, 0.2)),
        ("std", (0.2, -0.1, 0.2)),
        ("std", (0.2, 0.2, 0.2, 0.2)),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"augment\.{field}="):
        AugmentConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        TwoViewTransform(AugmentConfig(**{field: value}))


def test_pil_blur_is_refused_on_the_device():
    AugmentConfig(photometric="cpu", blur="pil").validate()
    with pytest.raises(ValueError, match=r"augment\.blur='pil' is invalid: expected gaussian when photometric"):
        AugmentConfig(photometric="device", blur="pil").validate()


# --- per-image transform ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("photometric", ["cpu", "device"])
@pytest.mark.parametrize("size", [32, 96])
def test_two_views_are_uint8_rgb_of_the_requested_size_and_differ(small_jpeg, recipe, photometric, size):
    transform = TwoViewTransform(AugmentConfig(recipe=recipe, size=size, photometric=photometric))
    views = transform(small_jpeg, np.random.default_rng(0))
    for view in (views.query_view, views.key_view):
        assert view.shape == (size, size, 3)
        assert view.dtype == np.uint8
    assert views.converted_from is None
    assert np.abs(views.query_view.astype(int) - views.key_view.astype(int)).mean() > 2.0


def test_same_seed_gives_identical_views_and_another_seed_does_not(small_jpeg):
    transform = TwoViewTransform(AugmentConfig(size=64))
    first = transform(small_jpeg, np.random.default_rng(7))
    again = transform(small_jpeg, np.random.default_rng(7))
    other = transform(small_jpeg, np.random.default_rng(8))
    np.testing.assert_array_equal(first.query_view, again.query_view)
    np.testing.assert_array_equal(first.key_view, again.key_view)
    assert not np.array_equal(first.query_view, other.query_view)
    assert not np.array_equal(first.key_view, other.key_view)


def test_the_two_views_draw_independent_parameters():
    transform = TwoViewTransform(AugmentConfig())
    rng = np.random.default_rng(0)
    pairs = [transform.sample_params(500, 375, rng) for _ in range(200)]
    assert all(query.crop != key.crop for query, key in pairs)
    flips = np.array([(query.flip, key.flip) for query, key in pairs])
    assert 0.35 < flips.mean() < 0.65
    assert not np.array_equal(flips[:, 0], flips[:, 1])


def test_draft_reduction_picks_the_largest_that_keeps_both_crops_at_least_size():
    big, medium = CropBox(0, 0, 900, 1200), CropBox(0, 0, 300, 400)
    assert draft_reduction([big], 100) == 8
    assert draft_reduction([big, medium], 100) == 2  # 300 / 2 >= 100 > 300 / 4
    assert draft_reduction([big, medium], 64) == 4
    assert draft_reduction([medium], 224) == 1  # never upsample because of the draft
    assert draft_reduction([CropBox(0, 0, 199, 5000)], 100) == 1


def test_large_jpeg_is_decoded_at_reduced_size_close_to_full_decoding(large_jpeg):
    config = AugmentConfig(size=64, photometric="device")  # geometry only: compare like with like
    drafted, full = TwoViewTransform(config), TwoViewTransform(config, use_draft=False)
    for seed in range(4):
        with_draft = drafted(large_jpeg, np.random.default_rng(seed))
        without = full(large_jpeg, np.random.default_rng(seed))
        # Every crop of a 1600 x 1200 image is >= 537 px a side, so a 1/8 decode still covers 64 px.
        assert with_draft.decoded_size == (200, 150)
        assert without.decoded_size == (1600, 1200)
        for fast, exact in ((with_draft.query_view, without.query_view), (with_draft.key_view, without.key_view)):
            difference = np.abs(fast.astype(float) - exact.astype(float))
            assert difference.mean() < 2.5
            np.testing.assert_allclose(fast.mean(axis=(0, 1)), exact.mean(axis=(0, 1)), atol=1.0)
            assert np.corrcoef(fast.ravel(), exact.ravel())[0, 1] > 0.995


def test_draft_is_skipped_when_the_output_needs_full_resolution(small_jpeg, photo):
    config = AugmentConfig(size=224)
    assert TwoViewTransform(config)(small_jpeg, np.random.default_rng(0)).decoded_size == (320, 240)
    png = _encode(photo.resize((1600, 1200)), "PNG", compress_level=1)
    views = TwoViewTransform(AugmentConfig(size=32))(png, np.random.default_rng(0))
    assert views.decoded_size == (1600, 1200)  # only JPEG has a reduced-size decode
    assert views.query_view.shape == (32, 32, 3)


def _torchvision_crop_box(width: int, height: int, scale, ratio) -> CropBox:
    top, left, crop_height, crop_width = RandomResizedCrop.get_params(torch.empty(3, height, width), scale, ratio)
    return CropBox(top, left, crop_height, crop_width)


@pytest.mark.parametrize("width,height", [(500, 375), (200, 600)])
def test_crop_boxes_follow_torchvision_random_resized_crop(width, height):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ours = [sample_crop_box(width, height, scale, ratio, rng) for _ in range(3000)]
    reference = [_torchvision_crop_box(width, height, list(scale), list(ratio)) for _ in range(3000)]
    for box in ours:
        assert 0 <= box.top and box.top + box.height <= height
        assert 0 <= box.left and box.left + box.width <= width
    areas, references_areas = (
        np.array([b.width * b.height / (width * height) for b in boxes]) for boxes in (ours, reference)
    )
    log_ratios, reference_log_ratios = (np.log([b.width / b.height for b in boxes]) for boxes in (ours, reference))
    assert areas.min() > 0.19 and areas.max() <= 1.0
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    # 3000 draws each: quantiles agree to ~0.01; a uniform (not log-uniform) ratio is off by > 0.04.
    np.testing.assert_allclose(np.quantile(areas, quantiles), np.quantile(references_areas, quantiles), atol=0.025)
    np.testing.assert_allclose(
        np.quantile(log_ratios, quantiles), np.quantile(reference_log_ratios, quantiles), atol=0.025
    )
    # Placement is uniform over the free range: the mean crop centre sits in the image centre.
    centres = np.array([(b.left + b.width / 2) / width for b in ours])
    assert abs(centres.mean() - 0.5) < 0.02


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000), (1000, 600)])
def test_crop_box_falls_back_to_torchvision_central_crop(width, height):
    # No box of area >= 0.95 with an aspect ratio in [3/4, 4/3] fits these images, so all ten
    # tries fail and both fall back to the same deterministic central crop.
    scale, ratio = (0.95, 1.0), (3 / 4, 4 / 3)
    box = sample_crop_box(width, height, scale, ratio, np.random.default_rng(0))
    assert box == _torchvision_crop_box(width, height, list(scale), list(ratio))


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is plainly not an image" * 10, "not_an_image"),
        ("truncated", "truncated"),
        ("one_pixel", "too_small"),
    ],
)
@pytest.mark.parametrize("size", [32, 224])
def test_bad_bytes_raise_image_decode_error_with_reason(photo, data, reason, size):
    if data == "truncated":
        whole = _encode(photo, quality=90)
        data = whole[: len(whole) // 2]
    elif data == "one_pixel":
        data = _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")
    with pytest.raises(ImageDecodeError) as raised:
        TwoViewTransform(AugmentConfig(size=size))(data, np.random.default_rng(0))
    assert raised.value.reason == reason


def _make_source(mode: str, photo: Image.Image) -> tuple[bytes, bool]:
    """Encoded bytes of ``photo`` (160 x 120) in ``mode`` and whether it is grey."""
    base = photo.resize((160, 120))
    if mode == "CMYK":
        return _encode(base.convert("CMYK"), "JPEG", quality=90), False
    if mode == "L":
        return _encode(base.convert("L"), "JPEG", quality=90), True
    if mode == "P":
        return _encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), False
    if mode == "LA":
        return _encode(base.convert("LA"), "PNG"), True
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(base.size))
        return _encode(rgba, "PNG"), False
    if mode == "I;16":
        gray = np.asarray(base.convert("L"), dtype=np.uint16) * 257
        return _encode(Image.fromarray(gray), "PNG"), True
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "LA", "RGBA", "I;16"])
def test_non_rgb_sources_give_rgb_views_and_report_their_mode(photo, mode):
    data, grey = _make_source(mode, photo)
    views = TwoViewTransform(AugmentConfig(size=48, photometric="device"))(data, np.random.default_rng(0))
    assert views.converted_from == mode
    for view in (views.query_view, views.key_view):
        assert view.shape == (48, 48, 3) and view.dtype == np.uint8
        assert view.std() > 5  # real content, not a flat fill
        if grey:
            assert np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 1], view[..., 2])


# --- the CPU photometric path against torchvision on PIL -------------------------------------


#: torchvision's ColorJitter operations in its permutation's index order.
_TORCHVISION_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _torchvision_photometric(image: Image.Image, params: PhotometricParams) -> Image.Image:
    """The official pipeline's functional calls, with ``params`` in place of its random draws."""

    def grey(img):
        return TF.rgb_to_grayscale(img, num_output_channels=3)

    if params.grayscale and params.grayscale_before_jitter:
        image = grey(image)
    if params.jitter is not None:
        jitter = params.jitter
        factors = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for op in jitter.order:
            image = _TORCHVISION_JITTER[op](image, factors[op])
    if params.grayscale and not params.grayscale_before_jitter:
        image = grey(image)
    if params.blur_sigma is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    return image


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_cpu_photometric_with_pil_blur_matches_torchvision_on_pil(photo, recipe):
    image = photo.resize((96, 64))
    rng = np.random.default_rng(3)
    seen_grey = seen_blur = seen_jitter = 0
    for _ in range(30):
        params = sample_photometric_params(PHOTOMETRIC_RECIPES[recipe], rng)
        ours = apply_photometric_cpu(image, params, blur="pil").astype(int)
        reference = np.asarray(_torchvision_photometric(image, params), dtype=int)
        difference = np.abs(ours - reference)
        # Only the hue step differs (it rebuilds RGB within 1 level); later steps can scale that.
        assert difference.max() <= 3
        assert difference.mean() < 0.3
        seen_grey += params.grayscale
        seen_blur += params.blur_sigma is not None
        seen_jitter += params.jitter is not None
    assert seen_grey and seen_jitter and (seen_blur or recipe == "v1")


def test_cpu_photometric_blurs_with_the_shared_gaussian(photo):
    image = photo.resize((96, 64))
    rng = np.random.default_rng(4)
    blurred = 0
    for _ in range(20):
        params = sample_photometric_params(PHOTOMETRIC_RECIPES["v2"], rng)
        ours = apply_photometric_cpu(image, params)
        assert ours.shape == (64, 96, 3) and ours.dtype == np.uint8 and ours.flags.writeable
        unblurred = apply_photometric_cpu(image, replace(params, blur_sigma=None))
        if params.blur_sigma is None:
            assert np.array_equal(ours, unblurred)
        else:
            blurred += 1
            assert np.array_equal(ours, gaussian_blur_uint8(unblurred, params.blur_sigma))
            # The two blurs approximate one Gaussian: close, not equal.
            official = apply_photometric_cpu(image, params, blur="pil").astype(int)
            assert np.abs(ours.astype(int) - official).mean() < 1.5
    assert blurred >= 5


@pytest.mark.parametrize("hue", [-0.5, -0.1, -0.02, 0.004, 0.05, 0.33, 0.5])
def test_pil_hue_shift_is_within_one_level_of_torchvision(photo, hue):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for image in (photo.resize((128, 96)), noise):
        difference = np.abs(np.asarray(_shift_hue_pil(image, hue), int) - np.asarray(TF.adjust_hue(image, hue), int))
        assert difference.max() <= 1
        assert difference.mean() < 0.25


@pytest.mark.parametrize("flip", [False, True])
def test_render_view_crops_resizes_and_flips_like_torchvision(photo, flip):
    crop = CropBox(top=40, left=70, height=300, width=360)
    params = ViewParams(crop=crop, flip=flip, photometric=None)
    ours = render_view(photo, params, 112).astype(float)
    reference = TF.resized_crop(photo, crop.top, crop.left, crop.height, crop.width, [112, 112])
    reference = np.asarray(TF.hflip(reference) if flip else reference, dtype=float)
    # PIL's box resize may read a few pixels beyond the crop edge where torchvision crops first.
    assert np.abs(ours - reference).mean() < 1.0
    assert np.abs(ours - reference)[4:-4, 4:-4].max() <= 1


def test_sampled_photometric_parameters_follow_the_recipes():
    rng = np.random.default_rng(0)
    for recipe_name, recipe in PHOTOMETRIC_RECIPES.items():
        draws = [sample_photometric_params(recipe, rng) for _ in range(4000)]
        jitters = [d.jitter for d in draws if d.jitter is not None]
        assert len(jitters) / len(draws) == pytest.approx(recipe.jitter_probability, abs=0.03)
        assert np.mean([d.grayscale for d in draws]) == pytest.approx(recipe.grayscale_probability, abs=0.03)
        sigmas = [d.blur_sigma for d in draws if d.blur_sigma is not None]
        assert len(sigmas) / len(draws) == pytest.approx(recipe.blur_probability, abs=0.03)
        if sigmas:
            assert recipe.blur_sigma[0] <= min(sigmas) and max(sigmas) <= recipe.blur_sigma[1]
        brightness, contrast, saturation, hue = recipe.jitter_strength
        for name, strength in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            values = np.array([getattr(j, name) for j in jitters])
            assert values.min() >= 1 - strength and values.max() <= 1 + strength, recipe_name
            assert values.mean() == pytest.approx(1.0, abs=0.02)
        hues = np.array([j.hue for j in jitters])
        assert hues.min() >= -hue and hues.max() <= hue and hues.min() < -0.9 * hue and hues.max() > 0.9 * hue
        assert all(sorted(j.order) == [0, 1, 2, 3] for j in jitters)
        assert len({j.order for j in jitters}) == 24


def test_neutral_jitter_leaves_the_image_unchanged():
    params = ColorJitterParams(order=(3, 2, 1, 0), brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    image = Image.new("RGB", (8, 8), (200, 30, 60))
    unchanged = apply_photometric_cpu(image, PhotometricParams(params, False, False, None))
    assert np.array_equal(np.asarray(unchanged), np.asarray(image))


def test_center_crop_view_is_deterministic_and_central(photo, large_jpeg):
    transform = CenterCropTransform(size=32)
    first, converted = transform(large_jpeg)
    again, _ = transform(large_jpeg)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and converted is None
    assert np.array_equal(first, again)
    # Same picture as cropping the central 87.5% square of the full decode and resizing.
    full = Image.open(io.BytesIO(large_jpeg)).convert("RGB")
    side = round(1200 * 0.875)
    box = ((1600 - side) // 2, (1200 - side) // 2, (1600 - side) // 2 + side, (1200 - side) // 2 + side)
    expected = np.asarray(full.resize((32, 32), Image.Resampling.BILINEAR, box=box), dtype=np.float32)
    assert np.abs(first.astype(np.float32) - expected).mean() < 4.0
    with pytest.raises(ImageDecodeError, match="not_an_image"):
        transform(b"definitely not an image")


def test_center_crop_fraction_one_keeps_a_small_square_image_whole():
    """The official CIFAR-10 demo's test view: the 32 px image itself, no crop and no resampling."""
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "PNG")
    whole, _ = CenterCropTransform(size=32, crop_fraction=1.0)(data)
    assert np.array_equal(whole, pixels)
    cropped, _ = CenterCropTransform(size=32)(data)  # 28 px centre scaled back up
    assert np.abs(cropped.astype(int) - pixels).mean() > 10
    with pytest.raises(ValueError, match="crop_fraction"):
        CenterCropTransform(size=32, crop_fraction=1.5)
