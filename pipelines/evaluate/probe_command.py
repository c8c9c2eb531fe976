"""``moco probe`` and ``moco knn``: thin commands over :func:`pipelines.evaluate.probe.run_probe`
and :func:`pipelines.evaluate.knn.run_knn`."""

from __future__ import annotations

import argparse

from pipelines.cli_common import UserError, add_overrides_option, positive_int

_SOURCE_HELP = (
    "SOURCE: a moco pretrain run directory (its newest checkpoint), a checkpoint directory or its model.pt, "
    "a backbone.pt, a torchvision state dict, or an official MoCo checkpoint (main_moco.py). Details: docs/EVALUATE.md."
)


def _add_data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--backbone", required=required, metavar="SOURCE", help="the frozen weights (path or URI)")
    parser.add_argument("--train", required=required, nargs="+", metavar="URI", help="labelled training images")
    parser.add_argument("--val", required=required, nargs="+", metavar="URI", help="labelled validation images")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    probe = commands.add_parser(
        "probe",
        parents=[common],
        help="linear classification protocol on a frozen backbone (full on Ray Train, or on cached features)",
        description="Train one fc layer on the frozen backbone's pooled features and report top-1/top-5 on --val. "
        "--mode full is the paper's protocol (official main_lincls.py: RandomResizedCrop + flip views every epoch, "
        "lr 30, 100 epochs, lr x0.1 at 60 and 80, batch 256) on Ray Train workers, with checkpoints and --resume; "
        "--mode cached extracts centre-crop features once with Ray Data, caches them in OUTPUT/features and trains "
        "the same layer on them in seconds.",
        epilog=f"{_SOURCE_HELP} Probe recipes: lincls (recipes/probe/*.yaml) or a YAML path.",
    )
    _add_data_options(probe, required=False)  # not with --resume
    probe.add_argument(
        "--output",
        metavar="DIR",
        help="probe directory (default: outputs/probe-<mode>-<time>, under $MOCO_STORAGE when set)",
    )
    probe.add_argument("--mode", choices=("full", "cached"), help="protocol (default: cached)")
    probe.add_argument("--recipe", help="probe recipe name or YAML path (default: lincls)")
    probe.add_argument("--resume", metavar="DIR", help="continue the interrupted full probe in DIR")
    probe.add_argument(
        "--force",
        action="store_true",
        help="replace the results of a finished cached probe in --output (its cached features are reused)",
    )
    add_overrides_option(probe, "override a probe config key, e.g. --set optim.lr=10 or --set model.arch=resnet50")
    probe.add_argument("--workers", type=positive_int, help="Ray Train workers for --mode full (scaling.workers)")
    probe.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (scaling.cpus_per_worker)")
    probe.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (scaling.gpus_per_worker)")
    probe.set_defaults(handler=_run_probe)

    knn = commands.add_parser(
        "knn",
        parents=[common],
        help="weighted kNN accuracy of a frozen backbone's features",
        description="Extract centre-crop features of --train (the bank) and --val (the queries) with Ray Data "
        "(cached in OUTPUT/features, shared with moco probe --mode cached) and report the weighted kNN top-1/top-5 "
        "(moco_core.knn: k nearest by cosine similarity, each voting exp(similarity / temperature)).",
        epilog=_SOURCE_HELP,
    )
    _add_data_options(knn, required=True)
    knn.add_argument(
        "--output",
        metavar="DIR",
        help="where features and knn_summary.json go (default: outputs/knn-<time>, under $MOCO_STORAGE when set)",
    )
    knn.add_argument(
        "--force", action="store_true", help="replace the knn_summary.json in --output (its cached features are reused)"
    )
    knn.add_argument("--k", type=positive_int, default=200, help="neighbours (default: 200, as the official demo)")
    knn.add_argument("--temperature", type=float, default=0.1, help="vote temperature (default: 0.1)")
    add_overrides_option(knn, "override a probe config key (view.*, data.*, cached.*, model.arch, ...)")
    knn.set_defaults(handler=_run_knn)


def _scaling_overrides(args: argparse.Namespace) -> list[str]:
    mapping = {"workers": "scaling.workers", "cpus_per_worker": "scaling.cpus_per_worker"}
    mapping["gpus_per_worker"] = "scaling.gpus_per_worker"
    return [f"{key}={getattr(args, name)}" for name, key in mapping.items() if getattr(args, name) is not None]


def _run_probe(args: argparse.Namespace) -> dict:
    from pipelines.evaluate.probe import load_probe_for_resume, run_probe
    from pipelines.evaluate.probe_config import load_probe_config
    from pipelines.filesystems import default_output_dir

    overrides = args.overrides + _scaling_overrides(args)
    if args.resume:
        given = [
            f"--{name}"
            for name in ("recipe", "backbone", "train", "val", "output", "mode", "force")
            if vars(args)[name]
        ]
        if given:
            raise UserError(
                f"--resume continues the probe in {args.resume} with its own backbone, data and config; "
                f"leave out {', '.join(given)} (--set overrides apply)"
            )
        config, inputs = load_probe_for_resume(args.resume, overrides)
        return run_probe(inputs["backbone"], inputs["train"], inputs["val"], args.resume, config, "full", resume=True)
    if not (args.backbone and args.train and args.val):
        raise UserError("moco probe needs --backbone, --train and --val (or --resume DIR)")
    mode = args.mode or "cached"
    config = load_probe_config(args.recipe, overrides)
    output = args.output or default_output_dir(f"probe-{mode}")
    return run_probe(args.backbone, args.train, args.val, output, config, mode, force=args.force)


def _run_knn(args: argparse.Namespace) -> dict:
    from pipelines.evaluate.knn import run_knn
    from pipelines.evaluate.probe_config import load_probe_config
    from pipelines.filesystems import default_output_dir

    config = load_probe_config(None, args.overrides)
    output = args.output or default_output_dir("knn")
    return run_knn(args.backbone, args.train, args.val, output, config, args.k, args.temperature, force=args.force)
