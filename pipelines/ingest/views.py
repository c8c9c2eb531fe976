"""Per-image view functions the Ray readers apply: two augmented views (pretraining), one
evaluation view (kNN, linear probes), or one linear-probe training view.

Both have the signature the readers expect, ``(bytes, rng) -> (views, converted_from)``, and are
plain picklable objects built on the driver and shipped to the reader tasks.
"""

from __future__ import annotations

import numpy as np

from moco_core.augment import AugmentConfig, CenterCropTransform, RandomResizedCropTransform, TwoViewTransform
from moco_core.image_io import ImageLimits

#: column names of the pretraining stream's views
TWO_VIEW_COLUMNS = ("query", "key")
#: column name of the evaluation stream's single view
EVAL_VIEW_COLUMNS = ("image",)


class TwoViewFunction:
    """MoCo's query and key views of one image (see :class:`moco_core.augment.TwoViewTransform`)."""

    columns = TWO_VIEW_COLUMNS

    def __init__(self, config: AugmentConfig, limits: ImageLimits | None = None):
        self.transform = TwoViewTransform(config, limits)
        self.bytes_per_row = 2 * config.size * config.size * 3

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], str | None]:
        views = self.transform(data, rng)
        return (views.query_view, views.key_view), views.converted_from


class EvalViewFunction:
    """One centre-cropped view per image, for kNN monitoring and linear probes; no randomness.

    Args:
        size: output side in pixels.
        limits: images outside these are rejected before decoding.
        crop_fraction: the central square's side as a fraction of the shorter side (0.875: the
            standard ImageNet crop; 1.0: the whole shorter side, no crop, for small square images
            such as CIFAR's, as the official CIFAR demo evaluates them).
    """

    columns = EVAL_VIEW_COLUMNS

    def __init__(self, size: int, limits: ImageLimits | None = None, *, crop_fraction: float = 0.875):
        self.transform = CenterCropTransform(size, crop_fraction=crop_fraction, limits=limits)
        self.bytes_per_row = size * size * 3

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], str | None]:
        view, converted_from = self.transform(data)
        return (view,), converted_from


class RandomCropViewFunction:
    """One RandomResizedCrop + flip view per image: the linear probe's training view.

    Args:
        size: output side in pixels.
        scale: crop area fraction range ((0.08, 1) in the official ``main_lincls.py``).
        limits: images outside these are rejected before decoding.
    """

    columns = EVAL_VIEW_COLUMNS

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), limits: ImageLimits | None = None):
        self.transform = RandomResizedCropTransform(size, scale, limits=limits)
        self.bytes_per_row = size * size * 3

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], str | None]:
        view, converted_from = self.transform(data, rng)
        return (view,), converted_from
