"""The official MoCo v2 data path (facebookresearch/moco ``main_moco.py``, "aug+"), rebuilt with
torchvision for the baselines: the same transforms, in the same order, with PIL's blur."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class OfficialGaussianBlur:
    """The official v2 blur: PIL GaussianBlur with sigma drawn from [0.1, 2.0]."""

    def __call__(self, image):
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class TwoCrops:
    """The official TwoCropsTransform: two independent augmentations of one image."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


def official_two_crops(size: int, scale: Sequence[float] = (0.2, 1.0)) -> TwoCrops:
    """MoCo v2's augmentation at ``size`` px, ending in ImageNet-normalised float tensors."""
    import torchvision.transforms as transforms

    augmentation = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(scale[0], scale[1])),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([OfficialGaussianBlur()], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(**IMAGENET_NORMALIZE),
        ]
    )
    return TwoCrops(augmentation)
