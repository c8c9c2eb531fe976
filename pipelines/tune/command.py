"""``moco tune probe|momentum|mechanism``: thin commands over :mod:`pipelines.tune`."""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable
from typing import Any

from pipelines.cli_common import UserError, add_overrides_option, positive_int


def _numbers(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


class _SweepParser(argparse.ArgumentParser):
    """Takes ``--lrs -1,10`` as the option's value: argparse's own rule reads only ``-1`` or
    ``-0.5`` as a negative number, and anything else starting with ``-`` as an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")


def _words(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="sweep directory (default: outputs/tune-<sweep>-<time>)")
    parser.add_argument("--space", metavar="NAME|YAML", help="built-in space name or a space YAML file (docs/TUNE.md)")
    parser.add_argument("--max-concurrent", type=positive_int, help="trials running at once")
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials kept)")


def _add_pretrain_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="base pretraining recipe name or YAML path")
    parser.add_argument("--data", nargs="+", metavar="URI", help="pretraining images")
    parser.add_argument("--val-data", nargs="+", metavar="URI", help="labelled images (kNN, probe validation)")
    add_overrides_option(parser, "override a key of the base recipe, e.g. --set training.epochs=20 (repeatable)")
    parser.add_argument("--workers", type=positive_int, help="Ray Train workers per trial (scaling.workers)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (scaling.cpus_per_worker)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (scaling.gpus_per_worker)")
    parser.add_argument(
        "--metric", choices=("probe", "knn"), default="probe", help="score: cached linear probe (default) or kNN"
    )
    parser.add_argument("--probe-lrs", type=_numbers(float), help="the probe's lr grid (default: 3,10,30)")
    parser.add_argument("--probe-recipe", default="lincls", help="probe recipe (default: lincls)")
    parser.add_argument(
        "--probe-set", dest="probe_overrides", action="append", default=[], metavar="KEY=VALUE", help="probe config key"
    )
    parser.add_argument("--probe-train", nargs="+", metavar="URI", help="probe training data (default: --data)")
    parser.add_argument("--probe-val", nargs="+", metavar="URI", help="probe validation data (default: --val-data)")
    parser.add_argument(
        "--oscillation-tolerance",
        type=float,
        default=0.05,
        help="a loss not decreasing at the end and swinging up and down by more than this share of its mean "
        "per logged step fails (a rise is no swing)",
    )


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tune = commands.add_parser(
        "tune",
        help="Ray Tune sweeps: linear-probe grid, momentum, mechanism x K (MLflow parent + nested runs)",
        description="Sweeps on Ray Tune, every trial a nested MLflow run under the sweep's run, with a results table "
        "and a plot. Details: docs/TUNE.md.",
    )
    sweeps = tune.add_subparsers(dest="sweep", metavar="SWEEP", parser_class=_SweepParser)

    probe = sweeps.add_parser(
        "probe",
        parents=[common],
        help="grid search of the linear probe (lr x weight decay) on features extracted once",
        description="Extract the backbone's features once (cached in OUTPUT/features), then train the fc layer of "
        "every grid point as a Tune trial on them, several at once; ASHA stops weak trials early when asked.",
    )
    probe.add_argument("--backbone", metavar="SOURCE", help="the frozen weights (any SOURCE of moco probe)")
    probe.add_argument("--train", nargs="+", metavar="URI", help="labelled training images")
    probe.add_argument("--val", nargs="+", metavar="URI", help="labelled validation images")
    _add_sweep_options(probe)
    probe.add_argument("--lrs", type=_numbers(float), help="replace the space's lr axis, e.g. 1,10,30")
    probe.add_argument("--weight-decays", type=_numbers(float), help="replace the space's weight-decay axis")
    probe.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo", help="fifo (default) or asha")
    probe.add_argument("--recipe", help="base probe recipe (default: lincls)")
    add_overrides_option(probe, "override a key of the base probe config, e.g. --set optim.epochs=30")
    probe.add_argument("--cpus-per-trial", type=float, default=0.5, help="CPUs each trial reserves (default 0.5)")
    probe.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves (default 0)")
    probe.set_defaults(handler=_run_probe)

    momentum = sweeps.add_parser(
        "momentum",
        parents=[common],
        help="one pretraining run per momentum m, each scored by the cached probe (the paper's table)",
        description="Pretrain once per key-encoder momentum (default m in 0, 0.9, 0.99, 0.999, 0.9999), probe each "
        "backbone on cached features over a small lr grid, and report the table; a diverging, oscillating or collapsed "
        "run is reported as fail.",
    )
    _add_pretrain_options(momentum)
    _add_sweep_options(momentum)
    momentum.add_argument("--values", type=_numbers(float), help="momentum values, e.g. 0,0.9,0.99,0.999,0.9999")
    momentum.set_defaults(handler=_run_momentum)

    mechanism = sweeps.add_parser(
        "mechanism",
        parents=[common],
        help="end-to-end, memory bank and MoCo across K (the paper's Figure 3)",
        description="Pretrain each mechanism at each dictionary size K; end-to-end's K is its batch, so only the "
        "batches that fit are run (--end-to-end-max-batch).",
    )
    _add_pretrain_options(mechanism)
    _add_sweep_options(mechanism)
    mechanism.add_argument("--k", type=_numbers(int), help="dictionary sizes, e.g. 256,1024,4096,16384")
    mechanism.add_argument("--mechanisms", type=_words, help="subset of end_to_end,memory_bank,moco")
    mechanism.add_argument("--end-to-end-max-batch", type=positive_int, help="largest end-to-end batch (default 1024)")
    mechanism.set_defaults(handler=_run_mechanism)
    tune.set_defaults(handler=lambda args: _missing_sweep(tune))


def _missing_sweep(parser: argparse.ArgumentParser) -> dict:
    raise UserError("moco tune needs a sweep: probe, momentum or mechanism (see moco tune --help)")


def _default_output(sweep: str) -> str:
    return os.path.join("outputs", f"tune-{sweep}-{time.strftime('%Y%m%d-%H%M%S')}")


def _resume(args: argparse.Namespace, sweep: str) -> dict:
    from pipelines.tune.resume import resume_sweep
    from pipelines.tune.sweep import read_sweep

    kind = read_sweep(args.resume)["kind"]
    if kind != sweep:
        raise UserError(f"{args.resume} holds a {kind} sweep; continue it with moco tune {kind} --resume {args.resume}")
    return resume_sweep(args.resume)


def _run_probe(args: argparse.Namespace) -> dict:
    from pipelines.evaluate.probe_config import load_probe_config
    from pipelines.tune.probe_sweep import run_probe_sweep
    from tune_spaces.probe_grid import DEFAULT_SPACE, probe_grid_points

    if args.resume:
        return _resume(args, "probe")
    if not (args.backbone and args.train and args.val):
        raise UserError("moco tune probe needs --backbone, --train and --val (or --resume DIR)")
    config = load_probe_config(args.recipe, args.overrides)
    points = probe_grid_points(args.space or DEFAULT_SPACE, args.lrs, args.weight_decays)
    return run_probe_sweep(
        args.backbone,
        args.train,
        args.val,
        args.output or _default_output("probe"),
        config,
        points,
        args.scheduler,
        args.max_concurrent,
        args.cpus_per_trial,
        args.gpus_per_trial,
    )


def _pretrain_inputs(args: argparse.Namespace, sweep: str):
    from pipelines.pretrain.config import load_config
    from pipelines.tune.pretrain_sweep import TrialProbe
    from tune_spaces.momentum import PROBE_LRS

    if not (args.recipe and args.data):
        raise UserError(f"moco tune {sweep} needs --recipe and --data (or --resume DIR)")
    scaling = {"workers": "scaling.workers", "cpus_per_worker": "scaling.cpus_per_worker"}
    scaling["gpus_per_worker"] = "scaling.gpus_per_worker"
    overrides = args.overrides + [f"{key}={getattr(args, n)}" for n, key in scaling.items() if getattr(args, n)]
    config = load_config(args.recipe, overrides)
    probe = TrialProbe(
        args.metric,
        tuple(args.probe_lrs or PROBE_LRS),
        args.probe_recipe,
        tuple(args.probe_overrides),
        tuple(args.probe_train or ()),
        tuple(args.probe_val or ()),
    )
    return config, probe


def _run_momentum(args: argparse.Namespace) -> dict:
    from pipelines.tune.pretrain_sweep import run_momentum_sweep

    if args.resume:
        return _resume(args, "momentum")
    config, probe = _pretrain_inputs(args, "momentum")
    return run_momentum_sweep(
        config,
        args.data,
        args.val_data,
        args.output or _default_output("momentum"),
        args.space or "paper",
        args.values,
        probe,
        args.max_concurrent,
        args.oscillation_tolerance,
    )


def _run_mechanism(args: argparse.Namespace) -> dict:
    from pipelines.tune.pretrain_sweep import run_mechanism_sweep

    if args.resume:
        return _resume(args, "mechanism")
    config, probe = _pretrain_inputs(args, "mechanism")
    return run_mechanism_sweep(
        config,
        args.data,
        args.val_data,
        args.output or _default_output("mechanism"),
        args.space or "paper",
        args.k,
        args.mechanisms,
        args.end_to_end_max_batch,
        probe,
        args.max_concurrent,
        args.oscillation_tolerance,
    )
