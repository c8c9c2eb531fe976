"""The ``moco`` command line: the product's commands.

Conventions for every subcommand: ``--json`` prints the command's results as one JSON object on
the last stdout line; progress goes to stderr; a failure exits non-zero with one clear line on
stderr (the traceback only with ``--debug``). Each subcommand lives beside its implementation and
registers itself through a ``register(commands, common)`` function.

``python -m pipelines.cli`` runs the commands listed in :data:`PRODUCT_COMMANDS`. The installed
``moco`` script (``benchmarks/entry_point.py``) adds ``moco bench`` by passing its registrar to
:func:`main`: the benchmarks depend on the product, never the reverse.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

from moco_core import __version__
from pipelines import demo, submit
from pipelines.cli_common import UserError, common_options
from pipelines.console import set_debug
from pipelines.evaluate import export_command, probe_command
from pipelines.ingest import shard_command
from pipelines.pretrain import command as pretrain_command
from pipelines.tune import command as tune_command

#: Adds one subcommand: ``register(commands, common)`` with the subparsers and the common options.
Registrar = Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]

PRODUCT_COMMANDS: tuple[Registrar, ...] = (
    shard_command.register,
    pretrain_command.register,
    demo.register,
    probe_command.register,
    export_command.register,
    tune_command.register,
    submit.register,
)


def build_parser(registrars: Sequence[Registrar] = PRODUCT_COMMANDS) -> argparse.ArgumentParser:
    """The ``moco`` parser with one subcommand per registrar; the description names exactly those."""
    parser = argparse.ArgumentParser(prog="moco", epilog="Run 'moco COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"moco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for register in registrars:
        register(commands, common)
    parser.description = f"MoCo self-supervised pretraining on Ray. Commands: {', '.join(commands.choices)}."
    return parser


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def main(argv: Sequence[str] | None = None, registrars: Sequence[Registrar] = PRODUCT_COMMANDS) -> int:
    """Run one ``moco`` command; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        registrars: the subcommands offered (default: the product's).
    """
    parser = build_parser(registrars)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], dict] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    set_debug(debug)
    try:
        results = handler(args)
    except KeyboardInterrupt as interrupt:
        print(f"moco: {interrupt}" if str(interrupt) else "moco: interrupted", file=sys.stderr)
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
