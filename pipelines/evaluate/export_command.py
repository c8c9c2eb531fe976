"""``moco export``: a pretrained backbone as a torchvision state dict or a detectron2 checkpoint.

A thin command over :func:`pipelines.evaluate.backbones.load_backbone` and
:func:`pipelines.evaluate.export.export_backbone`.
"""

from __future__ import annotations

import argparse

from pipelines.cli_common import UserError, add_overrides_option

_BACKBONE_KEYS = ("model.arch", "model.small_image_stem")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "export",
        parents=[common],
        help="export a pretrained backbone for torchvision or detectron2",
        description="Write the backbone in SOURCE as a torchvision state dict (no fc; loads into "
        "torchvision.models.<arch>() with only fc.weight and fc.bias missing) or as a detectron2 checkpoint "
        "(the official convert-pretrain-to-detectron2.py result), plus FILE.json recording where it came from "
        "(source, MLflow run id, step, config) and how to load it.",
        epilog="SOURCE: a moco pretrain run directory (its newest checkpoint), a checkpoint directory or its "
        "model.pt, a backbone.pt, a torchvision state dict, or an official MoCo checkpoint (main_moco.py). "
        "Details: docs/EVALUATE.md.",
    )
    parser.add_argument("--backbone", required=True, metavar="SOURCE", help="the weights to export (path or URI)")
    parser.add_argument(
        "--format", required=True, choices=("torchvision", "detectron2"), dest="file_format", help="output format"
    )
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="file to write (path or URI)")
    parser.add_argument("--force", action="store_true", help="overwrite FILE (and FILE.json) if it exists")
    add_overrides_option(
        parser,
        "model.arch=NAME or model.small_image_stem=true|false: override the architecture read from the "
        "run's config or inferred from the weights (repeatable)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> dict:
    from pipelines.console import note
    from pipelines.evaluate.backbones import load_backbone, split_backbone_overrides
    from pipelines.evaluate.export import check_output_free, export_backbone

    try:
        arch, small_image_stem, rest = split_backbone_overrides(args.overrides)
    except ValueError as error:
        raise UserError(f"--set {error}") from None
    if rest:
        accepted = " and ".join(f"--set {key}=..." for key in _BACKBONE_KEYS)
        raise UserError(f"moco export accepts {accepted}; got --set {rest[0]}")
    check_output_free(args.output, args.force)  # before loading a large checkpoint
    backbone = load_backbone(args.backbone, arch=arch, small_image_stem=small_image_stem)
    step = backbone.provenance.get("step")
    stem = ", small-image stem (3x3 conv1, no max-pool)" if backbone.small_image_stem else ""
    note(
        f"export: {backbone.arch}{stem} from {backbone.kind} {backbone.source}"
        + (f" at step {step}" if step is not None else "")
    )
    results = export_backbone(backbone, args.file_format, args.output, force=args.force)
    note(f"export: wrote {results['output']} ({args.file_format}) and {results['sidecar']}")
    if backbone.small_image_stem:
        note("export: stock torchvision and detectron2 ResNets have a 7x7 stem; see how_to_load in the sidecar")
    return results
