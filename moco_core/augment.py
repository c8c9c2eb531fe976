"""MoCo two-view augmentation: encoded image bytes -> two independently augmented uint8 views.

Recipes (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
https://arxiv.org/abs/1911.05722, and Chen et al., "Improved Baselines with Momentum Contrastive
Learning", https://arxiv.org/abs/2003.04297), as in the official main_moco.py:

- ``v1``: RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
  horizontal flip.
- ``v2``: RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
  RandomGrayscale(0.2), GaussianBlur(sigma in [0.1, 2]) with p=0.5, horizontal flip.

The work is split in two so that ingest stays cheap:

- geometry (decode, crop, resize, flip) always runs per image in :class:`TwoViewTransform`. Both
  crop boxes are drawn from the header size before decoding, so a JPEG is decoded once at the
  largest DCT reduction (1/2, 1/4, 1/8) that still leaves both crops at least ``size`` pixels a side;
- the photometric part (colour jitter, grayscale, blur) runs either per image on the CPU
  (``photometric="cpu"``: colour jitter and grayscale are the PIL operations torchvision uses on
  PIL images, the same pixels with the hue within one level), or batched on the training device
  with torch ops (``photometric="device"``, :func:`moco_core.photometric.photometric_batch`).
  Both blur with the same discrete Gaussian of variance sigma^2 (:mod:`moco_core.blur`);
  ``blur="pil"`` selects the official code's PIL blur instead, on the CPU.

Either way the training loop turns the uint8 views into model input with
:func:`moco_core.photometric.prepare_model_input`, normalised with ``AugmentConfig.mean`` and
``std`` (ImageNet's unless a recipe says otherwise).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageChops, ImageEnhance, ImageFilter

from moco_core.blur import gaussian_blur_uint8
from moco_core.image_io import ImageLimits, decode_rgb, open_image

Recipe = Literal["v1", "v2", "cifar"]
PhotometricPlacement = Literal["cpu", "device"]
BlurKind = Literal["gaussian", "pil"]
RECIPES: tuple[str, ...] = ("v1", "v2", "cifar")
PHOTOMETRIC_PLACEMENTS: tuple[str, ...] = ("cpu", "device")
BLUR_KINDS: tuple[str, ...] = ("gaussian", "pil")

#: Per-channel (R, G, B) statistics of [0, 1] pixels that model input is normalised with by default.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2, as PIL's ``convert("L")``).
LUMA_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)
#: JPEG DCT-domain reductions PIL's ``draft`` can decode at, largest first.
_DRAFT_REDUCTIONS: tuple[int, ...] = (8, 4, 2)
#: Box-reduce before resampling once a crop is this many times larger than the output (PIL's
#: ``reducing_gap``; 3 is visually indistinguishable from plain resampling). Mostly large crops
#: of non-JPEG images get here: JPEG crops are drafted to under 2x the output up to the 1/8 limit.
_RESIZE_REDUCING_GAP = 3.0
#: Colour-jitter operations, in the index order torchvision's ColorJitter uses for its permutation.
JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_SATURATION, JITTER_HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class PhotometricRecipe:
    """The photometric half of a recipe (probabilities and strengths).

    Attributes:
        jitter_strength: ColorJitter (brightness, contrast, saturation, hue) strengths.
        jitter_probability: chance that a view is colour-jittered at all.
        grayscale_probability: chance that a view is turned grey.
        grayscale_before_jitter: v1 greys before jittering, v2 after.
        blur_probability: chance that a view is blurred.
        blur_sigma: Gaussian blur standard deviation range in output pixels.
    """

    jitter_strength: tuple[float, float, float, float]
    jitter_probability: float
    grayscale_probability: float
    grayscale_before_jitter: bool
    blur_probability: float
    blur_sigma: tuple[float, float]


PHOTOMETRIC_RECIPES: dict[str, PhotometricRecipe] = {
    "v1": PhotometricRecipe((0.4, 0.4, 0.4, 0.4), 1.0, 0.2, True, 0.0, (0.1, 2.0)),
    "v2": PhotometricRecipe((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, False, 0.5, (0.1, 2.0)),
    # The official CIFAR-10 demo: v2's jitter and grayscale, no blur (32 px views are small). Its
    # crop scale (0.08, 1) and CIFAR statistics are AugmentConfig fields, set by recipes/cifar-v2.yaml.
    "cifar": PhotometricRecipe((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, False, 0.0, (0.1, 2.0)),
}


@dataclass(frozen=True)
class AugmentConfig:
    """How the two views of an image are made.

    Attributes:
        recipe: ``v1`` (MoCo), ``v2`` (MoCo v2, "aug+") or ``cifar`` (the official CIFAR-10
            demo's photometric part: v2 without blur).
        size: output side in pixels (views are ``size`` x ``size``).
        crop_scale: RandomResizedCrop area range, as a fraction of the image area.
        crop_ratio: RandomResizedCrop aspect-ratio (width / height) range.
        photometric: where colour jitter, grayscale and blur run: ``cpu`` (per image, inside the
            ingest) or ``device`` (batched on the training device, :func:`photometric_batch`).
        blur: ``gaussian`` (the discrete Gaussian of :mod:`moco_core.blur`, variance sigma^2,
            on either placement) or ``pil`` (PIL's extended-box ``GaussianBlur``, the blur the
            official code calls; ``cpu`` only).
        mean, std: per-channel (R, G, B) statistics of [0, 1] pixels; model input is
            ``(pixels / 255 - mean) / std`` (:func:`moco_core.photometric.prepare_model_input`).
            ImageNet's by default; a recipe sets its dataset's (the CIFAR-10 demo's, for example).
    """

    recipe: Recipe = "v2"
    size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    photometric: PhotometricPlacement = "cpu"
    blur: BlurKind = "gaussian"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        scale, ratio = tuple(self.crop_scale), tuple(self.crop_ratio)
        mean, std = tuple(self.mean), tuple(self.std)
        checks = [
            (self.recipe in RECIPES, "recipe", f"one of {', '.join(RECIPES)}"),
            (isinstance(self.size, int) and self.size >= 1, "size", "a positive integer"),
            (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "crop_scale", "(low, high) with 0 < low <= high <= 1"),
            (len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "crop_ratio", "(low, high) with 0 < low <= high"),
            (
                self.photometric in PHOTOMETRIC_PLACEMENTS,
                "photometric",
                f"one of {', '.join(PHOTOMETRIC_PLACEMENTS)}",
            ),
            (self.blur in BLUR_KINDS, "blur", f"one of {', '.join(BLUR_KINDS)}"),
            (
                self.blur != "pil" or self.photometric == "cpu",
                "blur",
                "gaussian when photometric is device (PIL's blur runs on the CPU only)",
            ),
            (len(mean) == 3 and all(map(math.isfinite, mean)), "mean", "three finite values (R, G, B)"),
            (
                len(std) == 3 and all(math.isfinite(value) and value > 0 for value in std),
                "std",
                "three finite values > 0 (R, G, B)",
            ),
        ]
        for ok, field, expected in checks:
            if not ok:
                value = getattr(self, field)
                shown = list(value) if isinstance(value, tuple) else value
                raise ValueError(f"augment.{field}={shown!r} is invalid: expected {expected}")

    @property
    def photometric_recipe(self) -> PhotometricRecipe:
        return PHOTOMETRIC_RECIPES[self.recipe]


# ---------------------------------------------------------------------------------------------
# Random parameters of one view


@dataclass(frozen=True)
class CropBox:
    """A crop in source pixels: torchvision's ``RandomResizedCrop.get_params`` ``(i, j, h, w)``."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class ColorJitterParams:
    """One draw of ColorJitter: the operation order and the four factors.

    Attributes:
        order: a permutation of 0..3 (brightness, contrast, saturation, hue), applied in this order.
        brightness, contrast, saturation: blend factors (1 = unchanged).
        hue: hue shift in turns, in [-0.5, 0.5] (0 = unchanged).
    """

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of the photometric part; ``None`` / ``False`` fields are skipped."""

    jitter: ColorJitterParams | None
    grayscale: bool
    grayscale_before_jitter: bool
    blur_sigma: float | None


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view; ``photometric`` is None when it runs on the device."""

    crop: CropBox
    flip: bool
    photometric: PhotometricParams | None


def sample_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> CropBox:
    """Draw a RandomResizedCrop box by torchvision's rule, from the image size alone.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), the first box
    that fits is placed uniformly; when none fits, the largest central crop with an aspect ratio
    clamped to ``ratio`` is returned.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return CropBox(top, left, crop_height, crop_width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def _jitter_factor(strength: float, rng: np.random.Generator) -> float:
    return float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)) if strength > 0 else 1.0


def sample_photometric_params(recipe: PhotometricRecipe, rng: np.random.Generator) -> PhotometricParams:
    """Draw the photometric part of one view with torchvision's distributions."""
    jitter = None
    if rng.random() < recipe.jitter_probability:
        brightness, contrast, saturation, hue = recipe.jitter_strength
        jitter = ColorJitterParams(
            order=tuple(int(op) for op in rng.permutation(4)),
            brightness=_jitter_factor(brightness, rng),
            contrast=_jitter_factor(contrast, rng),
            saturation=_jitter_factor(saturation, rng),
            hue=float(rng.uniform(-hue, hue)) if hue > 0 else 0.0,
        )
    grayscale = bool(rng.random() < recipe.grayscale_probability)
    blur_sigma = float(rng.uniform(*recipe.blur_sigma)) if rng.random() < recipe.blur_probability else None
    return PhotometricParams(jitter, grayscale, recipe.grayscale_before_jitter, blur_sigma)


def sample_view_params(width: int, height: int, config: AugmentConfig, rng: np.random.Generator) -> ViewParams:
    """Draw all random parameters of one view of a ``width`` x ``height`` image."""
    crop = sample_crop_box(width, height, config.crop_scale, config.crop_ratio, rng)
    flip = bool(rng.random() < 0.5)
    photometric = sample_photometric_params(config.photometric_recipe, rng) if config.photometric == "cpu" else None
    return ViewParams(crop, flip, photometric)


def draft_reduction(crops: Sequence[CropBox], size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps every crop >= ``size`` a side."""
    shortest_side = min(min(crop.width, crop.height) for crop in crops)
    for reduction in _DRAFT_REDUCTIONS:
        if shortest_side >= reduction * size:
            return reduction
    return 1


# ---------------------------------------------------------------------------------------------
# Per-image CPU path (PIL)


@functools.lru_cache(maxsize=256)
def _hue_blend_masks(shift: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """HSV -> RGB as blend weights: LUTs from the 8-bit hue, shifted by ``shift``, to mask bytes.

    Channel n (R, G, B) = V - C * w_n(h) = V + (min - V) * w_n(h), with w_n piecewise linear in h,
    so each output channel is one ``composite(min, V, mask=w_n(H))``.
    """
    shifted_hue = (np.arange(256) + shift) % 256
    masks = []
    for offset in (5.0, 3.0, 1.0):
        k = np.mod(offset + shifted_hue * 6.0 / 255.0, 6.0)  # PIL's 8-bit hue spans 6 sextants over 0..255
        weight = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        masks.append(tuple(np.round(weight * 255.0).astype(np.uint8).tolist()))
    return masks[0], masks[1], masks[2]


def _shift_hue_pil(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue`` (8-bit H += int(hue * 255), wrapping), within 1 level.

    PIL's HSV -> RGB conversion is its slowest step; rebuilding RGB from V, min(R, G, B) and three
    blend masks looked up from the shifted hue halves the cost of the whole hue step.
    """
    shift = int(hue * 255) % 256
    if shift == 0:
        return image
    hue_band, _, max_band = image.convert("HSV").split()
    red, green, blue = image.split()
    min_band = ImageChops.darker(ImageChops.darker(red, green), blue)
    channels = [Image.composite(min_band, max_band, hue_band.point(mask)) for mask in _hue_blend_masks(shift)]
    return Image.merge("RGB", channels)


def _color_jitter_pil(image: Image.Image, jitter: ColorJitterParams) -> Image.Image:
    # Saturation and hue leave a grey image unchanged, so an "L" image skips them.
    for op in jitter.order:
        if op == JITTER_BRIGHTNESS and jitter.brightness != 1.0:
            image = ImageEnhance.Brightness(image).enhance(jitter.brightness)
        elif op == JITTER_CONTRAST and jitter.contrast != 1.0:
            image = ImageEnhance.Contrast(image).enhance(jitter.contrast)
        elif op == JITTER_SATURATION and jitter.saturation != 1.0 and image.mode == "RGB":
            image = ImageEnhance.Color(image).enhance(jitter.saturation)
        elif op == JITTER_HUE and image.mode == "RGB":
            image = _shift_hue_pil(image, jitter.hue)
    return image


def _rgb_array(pixels: np.ndarray) -> np.ndarray:
    """A writable (H, W, 3) uint8 array of an (H, W) or (H, W, 3) image; copied only when needed."""
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels if pixels.flags.writeable else np.array(pixels)


def apply_photometric_cpu(image: Image.Image, params: PhotometricParams, blur: BlurKind = "gaussian") -> np.ndarray:
    """Colour jitter, grayscale and blur of one RGB view on one CPU core.

    Jitter and grayscale are the PIL operations torchvision uses on PIL images (the hue within
    one level); a greyed view stays one channel until the end, a third of the work. ``blur``
    picks the Gaussian of :mod:`moco_core.blur` or the official code's PIL blur.

    Shape:
        return: (H, W, 3) uint8
    """
    if params.grayscale and params.grayscale_before_jitter:
        image = image.convert("L")
    if params.jitter is not None:
        image = _color_jitter_pil(image, params.jitter)
    if params.grayscale and not params.grayscale_before_jitter:
        image = image.convert("L")
    if params.blur_sigma is not None and blur == "pil":
        image = image.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    pixels = np.asarray(image)
    if params.blur_sigma is not None and blur == "gaussian":
        pixels = gaussian_blur_uint8(pixels, params.blur_sigma)
    return _rgb_array(pixels)


def render_view(
    image: Image.Image,
    params: ViewParams,
    size: int,
    source_scale: tuple[float, float] = (1.0, 1.0),
    blur: BlurKind = "gaussian",
) -> np.ndarray:
    """Crop + resize (one bilinear PIL call), flip, then the photometric part if ``params`` has one.

    Args:
        image: the decoded RGB image.
        params: the view's random parameters; its crop is in header (undrafted) pixels.
        size: output side.
        source_scale: decoded size / header size per axis (x, y); below 1 after a JPEG draft.
        blur: which blur the photometric part uses (see :func:`apply_photometric_cpu`).

    Returns:
        The view, uint8.

    Shape:
        return: (size, size, 3)
    """
    crop, (scale_x, scale_y) = params.crop, source_scale
    box = (
        crop.left * scale_x,
        crop.top * scale_y,
        (crop.left + crop.width) * scale_x,
        (crop.top + crop.height) * scale_y,
    )
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=_RESIZE_REDUCING_GAP)
    if params.flip:
        # Flipping first is equivalent (every photometric operation is mirror-symmetric) and cheaper.
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.photometric is not None:
        return apply_photometric_cpu(view, params.photometric, blur)
    return _rgb_array(np.asarray(view))


@dataclass(frozen=True)
class TwoViews:
    """The two views of one image.

    Attributes:
        query_view, key_view: uint8 RGB, independently augmented.
        converted_from: the source mode when it was not RGB (``L``, ``CMYK``, ``P`` ...), else None.
        decoded_size: (width, height) actually decoded; smaller than the header size after a draft.

    Shape:
        query_view, key_view: (size, size, 3)
    """

    query_view: np.ndarray
    key_view: np.ndarray
    converted_from: str | None
    decoded_size: tuple[int, int]


class TwoViewTransform:
    """Encoded image bytes -> :class:`TwoViews`, for one image, on one CPU core.

    Both crops are drawn from the header size, the JPEG is decoded once at the largest DCT
    reduction that keeps both crops at least ``size`` pixels a side (never causing an upsample),
    each view is cropped and resized in one bilinear PIL call, flipped, and, when
    ``config.photometric == "cpu"``, colour-jittered / greyed / blurred (:func:`apply_photometric_cpu`).

    A seeded ``rng`` makes the result reproducible; the two views draw independent parameters.

    Args:
        config: the augmentation; validated here.
        limits: images outside these are rejected before decoding (default :class:`ImageLimits`).
        use_draft: decode JPEGs at reduced size when the crops allow it (off only to compare).
    """

    def __init__(self, config: AugmentConfig, limits: ImageLimits | None = None, use_draft: bool = True):
        config.validate()
        self.config = config
        self.limits = limits if limits is not None else ImageLimits()
        self.use_draft = use_draft

    def sample_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[ViewParams, ViewParams]:
        """Both views' random parameters for a ``width`` x ``height`` image."""
        return (
            sample_view_params(width, height, self.config, rng),
            sample_view_params(width, height, self.config, rng),
        )

    def __call__(self, data: bytes, rng: np.random.Generator) -> TwoViews:
        """Decode ``data`` and make its two views.

        Raises:
            ImageDecodeError: the bytes are not a usable image (``reason`` says why).
        """
        image = open_image(data, self.limits)
        width, height = image.size
        query_params, key_params = self.sample_params(width, height, rng)
        source_scale = (1.0, 1.0)
        reduction = draft_reduction((query_params.crop, key_params.crop), self.config.size) if self.use_draft else 1
        if reduction > 1:
            drafted = image.draft("RGB", (width // reduction, height // reduction))  # None: not a JPEG
            if drafted is not None:
                _, (_, _, drafted_width, drafted_height) = drafted
                source_scale = (drafted_width / width, drafted_height / height)
        decoded = decode_rgb(image)
        size, blur = self.config.size, self.config.blur
        return TwoViews(
            query_view=render_view(decoded.image, query_params, size, source_scale, blur),
            key_view=render_view(decoded.image, key_params, size, source_scale, blur),
            converted_from=decoded.converted_from,
            decoded_size=decoded.image.size,
        )


def _render_drafted(image: Image.Image, params: ViewParams, size: int) -> tuple[np.ndarray, str | None]:
    """Decode ``image`` at the largest JPEG reduction its crop allows, then render one view."""
    width, height = image.size
    source_scale = (1.0, 1.0)
    reduction = draft_reduction((params.crop,), size)
    if reduction > 1:
        drafted = image.draft("RGB", (width // reduction, height // reduction))  # None: not a JPEG
        if drafted is not None:
            _, (_, _, drafted_width, drafted_height) = drafted
            source_scale = (drafted_width / width, drafted_height / height)
    decoded = decode_rgb(image)
    return render_view(decoded.image, params, size, source_scale), decoded.converted_from


class CenterCropTransform:
    """Encoded image bytes -> one deterministic evaluation view (uint8), for kNN and linear probes.

    The standard evaluation crop: resize the shorter side to ``size / crop_fraction`` (256 for
    224) and take the central ``size`` square, done as one PIL resize of the central box. JPEGs
    are decoded at the largest DCT reduction that keeps the box at least ``size`` pixels a side.

    Args:
        size: output side in pixels.
        crop_fraction: the central square's side as a fraction of the shorter side.
        limits: images outside these are rejected before decoding.

    Shape:
        returns (size, size, 3) uint8
    """

    def __init__(self, size: int = 224, crop_fraction: float = 0.875, limits: ImageLimits | None = None):
        if size < 1 or not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"invalid centre crop: size={size}, crop_fraction={crop_fraction}")
        self.size = size
        self.crop_fraction = crop_fraction
        self.limits = limits if limits is not None else ImageLimits()

    def __call__(self, data: bytes) -> tuple[np.ndarray, str | None]:
        """The view and the source mode when it was not RGB.

        Raises:
            ImageDecodeError: the bytes are not a usable image.
        """
        image = open_image(data, self.limits)
        width, height = image.size
        side = max(1, int(round(min(width, height) * self.crop_fraction)))
        crop = CropBox(top=(height - side) // 2, left=(width - side) // 2, height=side, width=side)
        return _render_drafted(image, ViewParams(crop, flip=False, photometric=None), self.size)


class RandomResizedCropTransform:
    """Encoded image bytes -> one RandomResizedCrop + horizontal-flip view (uint8): the training
    view of the linear classification protocol (official ``main_lincls.py``), no colour changes.

    Args:
        size: output side in pixels.
        scale: area fraction range of the crop (torchvision's default (0.08, 1)).
        ratio: aspect-ratio (width / height) range.
        limits: images outside these are rejected before decoding.

    Shape:
        returns (size, size, 3) uint8
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        limits: ImageLimits | None = None,
    ):
        if size < 1 or not 0.0 < scale[0] <= scale[1] <= 1.0 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"invalid random resized crop: size={size}, scale={scale}, ratio={ratio}")
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.limits = limits if limits is not None else ImageLimits()

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[np.ndarray, str | None]:
        """The view and the source mode when it was not RGB.

        Raises:
            ImageDecodeError: the bytes are not a usable image.
        """
        image = open_image(data, self.limits)
        crop = sample_crop_box(*image.size, self.scale, self.ratio, rng)
        flip = bool(rng.random() < 0.5)
        return _render_drafted(image, ViewParams(crop, flip=flip, photometric=None), self.size)
