"""Real colour photographs that ship inside Python packages, for data built offline (the demo
dataset, the ingest benchmark corpus): scikit-learn's two, matplotlib's one and, when
scikit-image is installed, seven of its sample photos."""

from __future__ import annotations

from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")


def source_photos() -> dict[str, Image.Image]:
    """The real colour photos available offline, by name (at least scikit-learn's two)."""
    from sklearn.datasets import load_sample_image

    photos = {name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in ("china", "flower")}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            photos["grace_hopper"] = Image.open(handle).convert("RGB")
    except Exception:  # noqa: BLE001 -- optional source
        pass
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 -- optional source; some need a download
            continue
        if array.ndim == 3 and array.shape[2] >= 3:
            photos[name] = Image.fromarray(array[:, :, :3])
    return photos
