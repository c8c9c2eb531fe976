"""Decoding untrusted image bytes: every failure becomes an ``ImageDecodeError`` with a short
reason, so ingest can skip and count bad data instead of crashing.

Uncurated collections hold every mode PIL knows. Convertible ones (L, P, CMYK, RGBA, LA,
16-bit, float) are turned into 8-bit RGB and reported through ``DecodedImage.converted_from``;
undecodable ones raise.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Reasons an image is skipped, as counted in manifests and training metrics.
SKIP_REASONS: tuple[str, ...] = ("empty", "not_an_image", "corrupt", "truncated", "too_small", "too_large")


class ImageDecodeError(ValueError):
    """Bytes that cannot be used as an image. ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """Images outside these limits are skipped.

    Attributes:
        min_side: shorter side in pixels below which an image is junk (1x1 trackers, icons).
        max_pixels: width x height above which decoding is refused (decompression bombs);
            PIL's own default.
    """

    min_side: int = 8
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit RGB
    converted_from: str | None  # the original mode when it was not RGB


def open_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Read only the header of ``data`` and check it against ``limits``; nothing is decoded yet.

    Raises:
        ImageDecodeError: empty, not an image, unreadable header, too small or too large.
    """
    if not data:
        raise ImageDecodeError("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "no image format recognised") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too_large", str(error)) from None
    except Exception as error:  # noqa: BLE001 -- any parser failure on untrusted bytes
        raise ImageDecodeError("corrupt", f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if min(width, height) < limits.min_side:
        raise ImageDecodeError("too_small", f"{width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} > {limits.max_pixels} pixels")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array * (255.0 / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(image: Image.Image) -> DecodedImage:
    """Decode an image returned by :func:`open_image` (after any ``draft``) into 8-bit RGB.

    Transparent pixels are composited over white.

    Raises:
        ImageDecodeError: truncated or corrupt data.
    """
    mode = image.mode
    try:
        image.load()
        rgb = _to_rgb(image)
    except OSError as error:
        reason = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise ImageDecodeError(reason, str(error)) from None
    except Exception as error:  # noqa: BLE001 -- any decoder failure on untrusted bytes
        raise ImageDecodeError("corrupt", f"{type(error).__name__}: {error}") from None
    return DecodedImage(rgb, None if mode == "RGB" else mode)
