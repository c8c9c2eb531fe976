"""``moco pretrain``: the main job, a thin command over :func:`pipelines.pretrain.driver.run_pretraining`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli_common import UserError, add_overrides_option, positive_int


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "pretrain",
        parents=[common],
        help="MoCo pretraining on Ray Train workers, tracked in MLflow",
        description="Pretrain a MoCo encoder on Ray Train workers fed by the Ray Data ingest. A recipe gives "
        "every setting; --set overrides dotted keys (validated before Ray starts). With a labelled --val-data "
        "the run also reports the kNN top-1 of the pretrained and of the randomly initialised backbone.",
        epilog="Recipes: in1m-v1, in1m-v2, ig1b-v1, cifar-v2, demo (recipes/*.yaml), or a YAML path. "
        "Config keys and output files: docs/PRETRAIN.md.",
    )
    parser.add_argument("--recipe", help="recipe name or YAML path (required unless --resume; not with it)")
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="URI",
        help="training images: shards, Parquet, tars, folders (required unless --resume, which reads the run's own; "
        "with --resume only a moved copy of them)",
    )
    parser.add_argument("--val-data", nargs="+", metavar="URI", help="labelled images for the kNN monitor")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="run directory, refused if it already holds a run (default: $MOCO_STORAGE/<recipe>-<time>, "
        "else outputs/<recipe>-<time>; not with --resume)",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR from its newest checkpoint")
    add_overrides_option(parser, "override a config key, e.g. --set optim.lr=0.06 (repeatable)")
    parser.add_argument("--workers", type=positive_int, help="Ray Train workers (scaling.workers)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (scaling.cpus_per_worker)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (scaling.gpus_per_worker)")
    parser.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--image-column", help="image column of Parquet data (data.image_column)")
    parser.add_argument("--label-column", help="label column of Parquet data (data.label_column)")
    parser.add_argument("--key-column", help="key column of Parquet data (data.key_column)")
    parser.set_defaults(handler=_run)


def _scaling_overrides(args: argparse.Namespace) -> list[str]:
    mapping = {
        "workers": "scaling.workers",
        "cpus_per_worker": "scaling.cpus_per_worker",
        "gpus_per_worker": "scaling.gpus_per_worker",
        "max_failures": "scaling.max_failures",
        "image_column": "data.image_column",
        "label_column": "data.label_column",
        "key_column": "data.key_column",
    }
    given = {key: getattr(args, name) for name, key in mapping.items() if getattr(args, name) is not None}
    # Column names are strings even when they read as numbers or booleans in YAML ("--image-column 0").
    return [f"{key}={json.dumps(value) if key.startswith('data.') else value}" for key, value in given.items()]


def _run(args: argparse.Namespace) -> dict:
    from pipelines.filesystems import default_output_dir
    from pipelines.pretrain.config import load_config
    from pipelines.pretrain.driver import load_run_for_resume, run_pretraining

    overrides = args.overrides + _scaling_overrides(args)
    if args.resume:
        if args.recipe:
            raise UserError("--resume continues a run with its own config; give --set overrides instead of --recipe")
        if args.output:
            raise UserError("--resume DIR continues the run in DIR, where it writes; leave out --output")
        config, inputs = load_run_for_resume(args.resume, overrides)
        return run_pretraining(
            config, args.data or inputs["data"], args.resume, val_data=args.val_data or inputs["val_data"], resume=True
        )
    if not args.recipe or not args.data:
        raise UserError("moco pretrain needs --recipe and --data (or --resume DIR)")
    config = load_config(args.recipe, overrides)
    output = args.output or default_output_dir(Path(args.recipe).stem)
    return run_pretraining(config, args.data, output, val_data=args.val_data)
