"""The ``moco`` command line.

Conventions for every subcommand: ``--json`` prints the command's results as one JSON object on
the last stdout line; progress goes to stderr; a failure exits non-zero with one clear line on
stderr (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

from moco_core import __version__


class UserError(Exception):
    """A problem the user can fix (bad option, missing file); shown as one line, no traceback."""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print the results as one JSON object on the last stdout line"
    )
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return common


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_bench_step(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "step",
        parents=[common],
        help="MoCo vs supervised training-step throughput and EMA update time",
        description="Measure supervised and MoCo training steps on the same backbone, batch and threads "
        "(ideal MoCo/supervised ratio ~0.75 by FLOPs) and the momentum-update time.",
    )
    parser.add_argument("--arch", default="resnet18", help="torchvision backbone (default: resnet18)")
    parser.add_argument("--image-size", type=_positive_int, default=64, help="input resolution in px (default: 64)")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="images per step (default: 256)")
    parser.add_argument(
        "--queue-sizes",
        type=_positive_int,
        nargs="+",
        default=[4096, 65536],
        help="MoCo queue sizes K to time; the first gives the ratio (default: 4096 65536)",
    )
    parser.add_argument(
        "--batchnorm",
        default="split",
        choices=["split", "none", "shuffle"],
        help="BatchNorm mode of the MoCo step (default: split, the single-process mode)",
    )
    parser.add_argument("--bn-splits", type=_positive_int, default=8, help="sub-batches for split BN (default: 8)")
    parser.add_argument("--small-image-stem", action="store_true", help="use the 3x3 stride-1 CIFAR stem")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default: 2)")
    parser.add_argument(
        "--steps", type=_positive_int, default=3, help="timed steps per configuration and round (default: 3)"
    )
    parser.add_argument(
        "--rounds", type=_positive_int, default=3, help="interleaved timing rounds; the median is reported (default: 3)"
    )
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 (no autocast, NCHW) comparison")
    parser.add_argument(
        "--ema-archs",
        nargs="*",
        default=["resnet18", "resnet50"],
        help="backbones for the EMA timing (default: resnet18 resnet50)",
    )
    parser.set_defaults(handler=_run_bench_step)


def _run_bench_step(args: argparse.Namespace) -> dict:
    from benchmarks.bench_step import run_step_benchmark

    return run_step_benchmark(
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        queue_sizes=args.queue_sizes,
        batchnorm=args.batchnorm,
        bn_splits=args.bn_splits,
        small_image_stem=args.small_image_stem,
        threads=args.threads,
        device=args.device,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        include_fp32=not args.no_fp32,
        ema_archs=args.ema_archs,
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="moco",
        description="MoCo self-supervised pretraining on Ray: build shards, pretrain, evaluate, benchmark.",
        epilog="Run 'moco COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"moco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmarks that print JSON with a 'ratio' against a baseline")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    _add_bench_step(benches, common)
    bench.set_defaults(handler=lambda args: _missing_subcommand(bench))
    return parser


def _missing_subcommand(parser: argparse.ArgumentParser) -> dict:
    parser.print_help(sys.stderr)
    raise UserError("missing subcommand")


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, sort_keys=False))
        return
    for key, value in results.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], dict] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        results = handler(args)
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, PermissionError) as error:
        if debug:
            traceback.print_exc()
        print(f"moco: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 -- the one place that turns crashes into one line
        if debug:
            traceback.print_exc()
        print(f"moco: error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    _print_results(results, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
