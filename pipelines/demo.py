"""``moco demo``: the whole main job on data every machine has, in a few minutes on 2 CPU cores.

Builds Parquet shards of scikit-learn's handwritten digits (1,797 real 8x8 scans, upscaled to
32 px; every fifth image held out as labelled validation data), pretrains with the ``demo``
recipe on a local Ray cluster, and reports the kNN top-1 of the pretrained backbone against the
same backbone at random initialisation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.console import note

DEMO_SIZE = 32


def write_digit_folders(root: Path) -> tuple[Path, Path]:
    """``root/images/{train,val}/<digit>/<n>.png``; returns the two folders (kept if present)."""
    from sklearn.datasets import load_digits

    train_dir, val_dir = root / "images" / "train", root / "images" / "val"
    if train_dir.exists() and val_dir.exists():
        return train_dir, val_dir
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = (val_dir if index % 5 == 0 else train_dir) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = (pixels * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(gray).resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.BICUBIC).convert("RGB")
        image.save(folder / f"{index:04d}.png")
    return train_dir, val_dir


def build_demo_shards(root: Path) -> tuple[str, str]:
    """Shards of the demo digits (reused on a rerun): (train shards, validation shards)."""
    from pipelines.ingest.shards import build_shards

    train_dir, val_dir = write_digit_folders(root)
    shards = root / "shards"
    build_shards([train_dir], shards / "train", images_per_shard=512, row_group_size=64, show_progress=False)
    build_shards([val_dir], shards / "val", images_per_shard=512, row_group_size=64, show_progress=False)
    return str(shards / "train"), str(shards / "val")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from pipelines.cli_common import positive_int

    parser = commands.add_parser(
        "demo",
        parents=[common],
        help="the main job end to end on handwritten digits (a few minutes on 2 CPU cores)",
        description="Build shards of scikit-learn's digits, pretrain with the demo recipe on a local Ray "
        "cluster, and report kNN top-1 of the pretrained vs the randomly initialised backbone.",
    )
    parser.add_argument("--work-dir", default="outputs/demo", help="data and run directory (default: outputs/demo)")
    parser.add_argument("--epochs", type=positive_int, help="override the demo recipe's epochs")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of the demo recipe (repeatable)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> dict:
    import time

    from pipelines.pretrain.config import load_config
    from pipelines.pretrain.driver import run_pretraining

    root = Path(args.work_dir).resolve()
    overrides = args.overrides + ([f"training.epochs={args.epochs}"] if args.epochs else [])
    config = load_config("demo", overrides)
    note(f"demo: building shards of scikit-learn's digits in {root / 'shards'}")
    train, val = build_demo_shards(root)
    run_dir = root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    summary = run_pretraining(config, [train], str(run_dir), val_data=[val])
    note("")
    note(
        f"kNN top-1 on held-out digits: {summary['knn_top1']:.1f}% after pretraining, "
        f"{summary['knn_top1_random_init']:.1f}% at random initialisation"
    )
    note(f"checkpoints: {run_dir / 'train'}   backbone: {summary.get('backbone')}")
    note(f"MLflow run {summary['mlflow_run_id']}: open the UI with  {summary['mlflow_ui']}")
    return summary
