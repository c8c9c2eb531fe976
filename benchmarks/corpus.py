"""An ImageNet-like JPEG corpus built offline from real photos shipped inside Python packages.

ImageNet training images average ~500x375 px and ~110 KB. We crop, resize, flip and re-encode
the colour photos that scikit-learn, matplotlib and (if installed) scikit-image ship, so decode
cost and file sizes look like ImageNet's. One class subfolder per source photo, so the folder
also works with torchvision's ImageFolder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from pipelines.console import Progress
from pipelines.sample_photos import source_photos


def _random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    landscape = rng.random() < 0.8
    aspect = 4 / 3 if landscape else 3 / 4
    area = width * height * rng.uniform(0.3, 1.0)
    crop_w = min(width, int(round((area * aspect) ** 0.5)))
    crop_h = min(height, int(round(crop_w / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    size = (500, 375) if landscape else (375, 500)
    view = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.8, 1.2))
    # Sensor-like grain: upscaled crops are smoother than camera photos and would encode too small.
    grain = rng.normal(0.0, 4.0, size=(view.size[1], view.size[0], 1))
    return Image.fromarray(np.clip(np.asarray(view, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def build_corpus(output_dir: str | os.PathLike, num_images: int = 2000, seed: int = 0, quality: int = 96) -> dict:
    """Write ``num_images`` JPEGs (~500x375) into ``output_dir/<photo>/NNNNNN.jpg`` unless present.

    Returns:
        ``{"path", "num_images", "mean_kb", "photos"}``.
    """
    output = Path(output_dir)
    existing = sorted(output.glob("*/*.jpg"))
    if len(existing) >= num_images:
        sizes = [path.stat().st_size for path in existing[:num_images]]
        return {
            "path": str(output),
            "num_images": len(existing),
            "mean_kb": round(np.mean(sizes) / 1024, 1),
            "photos": sorted({path.parent.name for path in existing}),
        }
    photos = source_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    progress = Progress("corpus", total=num_images, unit="img")
    sizes = []
    for index in range(num_images):
        name = names[index % len(names)]
        (output / name).mkdir(parents=True, exist_ok=True)
        path = output / name / f"{index:06d}.jpg"
        _random_view(photos[name], rng).save(path, "JPEG", quality=quality)
        sizes.append(path.stat().st_size)
        progress.update(index + 1)
    progress.finish(num_images)
    return {
        "path": str(output),
        "num_images": num_images,
        "mean_kb": round(float(np.mean(sizes)) / 1024, 1),
        "photos": names,
    }


def default_work_dir() -> Path:
    """Where benchmark corpora and shards are kept between runs."""
    import tempfile

    return Path(tempfile.gettempdir()) / "moco-bench"


def corpus_with_shards(work_dir: str | os.PathLike | None, num_images: int) -> tuple[dict, str]:
    """The corpus (built once) and its ``moco shard`` shards (built once): (corpus info, shards path)."""
    from pipelines.console import note
    from pipelines.ingest.shards import build_shards

    work = Path(work_dir) if work_dir else default_work_dir()
    corpus = build_corpus(work / f"corpus-{num_images}", num_images)
    shards = work / f"shards-{num_images}"
    build_shards([corpus["path"]], str(shards), show_progress=False)
    note(f"benchmark corpus: {corpus['num_images']} JPEGs, mean {corpus['mean_kb']} KB; shards in {shards}")
    return corpus, str(shards)


def small_corpus_with_shards(work_dir: str | os.PathLike | None) -> tuple[dict, str]:
    """32 px crops of the real photos (the demo's training set, PNG) and their shards."""
    from pipelines.console import note
    from pipelines.demo import write_photo_crops
    from pipelines.ingest.shards import build_shards

    work = Path(work_dir) if work_dir else default_work_dir()
    root = work / "corpus-32px"
    if not (root / "train").is_dir():
        write_photo_crops(root)
    paths = sorted((root / "train").glob("*/*.png"))
    shards = work / "shards-32px"
    build_shards([str(root / "train")], str(shards), show_progress=False)
    sizes = [path.stat().st_size for path in paths]
    note(f"benchmark corpus: {len(paths)} 32 px PNG photo crops; shards in {shards}")
    corpus = {"path": str(root / "train"), "num_images": len(paths), "mean_kb": round(float(np.mean(sizes)) / 1024, 2)}
    return corpus, str(shards)
