"""``moco shard SRC... --output DIR``: build the Parquet shards that training reads (docs/DATA.md)."""

from __future__ import annotations

import argparse

from moco_core.image_io import ImageLimits
from pipelines.cli_common import positive_int
from pipelines.ingest.shards import DEFAULT_IMAGES_PER_SHARD, DEFAULT_JPEG_QUALITY, DEFAULT_ROW_GROUP_SIZE


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``shard`` subcommand to the ``moco`` parser."""
    parser = commands.add_parser(
        "shard",
        parents=[common],
        help="build Parquet shards from image folders, path lists or WebDataset tars",
        description="Validate every image and write Parquet shards (key, image bytes, label, width, height) "
        "plus DIR/_manifest.json. Bad images are skipped and listed in the manifest with a reason. "
        "Rerunning on the same DIR builds only the shards that are missing.",
        epilog="Sources: a folder (class subfolders give labels, a flat folder gives unlabeled images), a text "
        "file of image paths ('path' or 'path<TAB>label' per line, label an integer or a class name; relative "
        "paths are relative to the list file), or a WebDataset .tar (img2dataset layout, optional .cls "
        "labels). See docs/DATA.md.",
    )
    parser.add_argument("sources", nargs="+", metavar="SRC", help="image folder, text file of paths, or .tar")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for shards and manifest")
    parser.add_argument(
        "--images-per-shard",
        metavar="N",
        type=positive_int,
        default=DEFAULT_IMAGES_PER_SHARD,
        help=f"images planned per shard; skipped images make a shard smaller (default: {DEFAULT_IMAGES_PER_SHARD})",
    )
    parser.add_argument(
        "--row-group-size",
        metavar="N",
        type=positive_int,
        default=DEFAULT_ROW_GROUP_SIZE,
        help="images per Parquet row group, the unit of parallel reading and shuffling "
        f"(default: {DEFAULT_ROW_GROUP_SIZE})",
    )
    parser.add_argument(
        "--max-side",
        type=positive_int,
        default=None,
        metavar="N",
        help="store images whose longer side exceeds N px as a JPEG downscaled to N px (default: keep every original)",
    )
    parser.add_argument(
        "--jpeg-quality",
        metavar="Q",
        type=_jpeg_quality,
        default=DEFAULT_JPEG_QUALITY,
        help=f"quality of the downscaled JPEGs, 1-95 (default: {DEFAULT_JPEG_QUALITY})",
    )
    parser.add_argument(
        "--min-side",
        metavar="N",
        type=positive_int,
        default=ImageLimits.min_side,
        help=f"skip images whose shorter side is below this, in px (default: {ImageLimits.min_side})",
    )
    parser.add_argument(
        "--max-pixels",
        metavar="N",
        type=positive_int,
        default=ImageLimits.max_pixels,
        help="skip images with more pixels than this (decompression bombs) "
        f"(default: {ImageLimits.max_pixels}, PIL's limit)",
    )
    parser.add_argument(
        "--shuffle-seed",
        metavar="S",
        type=int,
        default=0,
        help="seed of the shuffle of folder and list images across shards; tar samples keep their order (default: 0)",
    )
    parser.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep folder and list images in sorted order (class folders then give single-class shards)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=None,
        help="processes validating and writing shards; 1 runs in-process (default: all CPU cores)",
    )
    parser.set_defaults(handler=_run_shard)


def _jpeg_quality(text: str) -> int:
    value = positive_int(text)
    if value > 95:
        raise argparse.ArgumentTypeError(f"expected 1-95 (PIL advises against higher), got {value}")
    return value


def _run_shard(args: argparse.Namespace) -> dict:
    from pipelines.ingest.shards import build_shards

    report = build_shards(
        args.sources,
        args.output,
        images_per_shard=args.images_per_shard,
        row_group_size=args.row_group_size,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        workers=args.workers,
    )
    return report.as_dict()
