"""Small real-format image collections written in the tests: folders, Parquet and WebDataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small image with smooth random content (real-looking enough to decode and crop)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_image_folder(root: Path, classes: dict[str, int], start_seed: int = 0) -> list[str]:
    """``root/<class>/<n>.jpg`` with ``classes[name]`` images each; returns the relative keys."""
    keys, seed = [], start_seed
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (root / name / f"{index:04d}.jpg").write_bytes(jpeg_bytes(seed))
            keys.append(f"{name}/{index:04d}")
            seed += 1
    return keys


def write_img2dataset_parquet(path: Path, count: int, rows_per_group: int, start_seed: int = 0) -> None:
    """img2dataset's parquet output: ``jpg`` bytes plus ``key``, ``url``, ``width``, ``height``."""
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(count)],
            "jpg": [jpeg_bytes(start_seed + i) for i in range(count)],
            "url": [f"https://example.com/{i}.jpg" for i in range(count)],
            "width": [48] * count,
            "height": [40] * count,
        }
    )
    pq.write_table(table, path, row_group_size=rows_per_group)


def write_huggingface_parquet(path: Path, count: int, rows_per_group: int, start_seed: int = 0) -> None:
    """Hugging Face ``datasets`` Image feature: ``image`` struct {bytes, path} plus an int ``label``."""
    images = [{"bytes": jpeg_bytes(start_seed + i), "path": f"img_{i}.jpg"} for i in range(count)]
    table = pa.table({"image": images, "label": [i % 3 for i in range(count)]})
    pq.write_table(table, path, row_group_size=rows_per_group)


def write_webdataset_tar(path: Path, count: int, start_seed: int = 0, with_labels: bool = True) -> None:
    """img2dataset's webdataset output: ``key.jpg``, ``key.json``, optional ``key.cls``."""
    with tarfile.open(path, "w") as archive:
        for i in range(count):
            key = f"{start_seed + i:09d}"
            members = {"jpg": jpeg_bytes(start_seed + i), "json": json.dumps({"key": key}).encode()}
            if with_labels:
                members["cls"] = str(i % 4).encode()
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def write_colour_classes(root: Path, counts: dict[str, int], seed: int = 0, size: tuple[int, int] = (48, 40)) -> None:
    """``root/<colour>/<n>.jpg``: noisy images around one colour per class (``red``, ``green``,
    ``blue``), so that even a randomly initialised backbone's features separate the classes."""
    colours = {"red": (180, 60, 60), "green": (60, 170, 60), "blue": (60, 60, 180)}
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            noise = rng.normal(0, 40, (size[1], size[0], 3))
            pixels = np.clip(np.array(colours[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:04d}.jpg", quality=90)


#: ``--set`` overrides of the demo recipe for a pretraining of seconds on 2 CPU workers: 16 px
#: views, a ResNet-18 with a 16-d head, batches of 8, a checkpoint every 2 steps.
TINY_PRETRAIN = [
    "model.arch=resnet18",
    "model.small_image_stem=true",
    "model.head=mlp",
    "model.dim=16",
    "model.queue_size=40",
    "model.temperature=0.2",
    "augment.size=16",
    "augment.recipe=cifar",
    "optim.batch_size=8",
    "optim.lr=0.05",
    "optim.schedule=cosine",
    "training.epochs=2",
    "training.log_every_steps=2",
    "training.precision=fp32",
    "checkpoint.every_steps=2",
    "checkpoint.keep=2",
    "eval.every_epochs=1",
    "eval.bank_size=40",
    "eval.batch_size=16",
    "scaling.workers=2",
    "scaling.cpus_per_worker=0.5",
]
