"""The ``moco`` command line.

Conventions for every subcommand: ``--json`` prints the command's results as one JSON object on
the last stdout line; progress goes to stderr; a failure exits non-zero with one clear line on
stderr (the traceback only with ``--debug``). Each subcommand lives beside its implementation and
registers itself here through a ``register(commands, common)`` function.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

from benchmarks import cli as bench_cli
from moco_core import __version__
from pipelines import demo
from pipelines.cli_common import UserError, common_options
from pipelines.ingest import shard_command
from pipelines.pretrain import command as pretrain_command

REGISTRARS: list[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]] = [
    shard_command.register,
    pretrain_command.register,
    demo.register,
    bench_cli.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco",
        description="MoCo self-supervised pretraining on Ray: build shards, pretrain, evaluate, benchmark.",
        epilog="Run 'moco COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"moco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for register in REGISTRARS:
        register(commands, common)
    return parser


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
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
