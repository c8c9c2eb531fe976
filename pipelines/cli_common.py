"""Pieces shared by every ``moco`` subcommand's argument parser."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A failure explained in one line (bad option, missing file, a run that stopped early);
    shown without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a job; the message says where it stopped and how to continue (exit 130)."""


def common_options() -> argparse.ArgumentParser:
    """Parent parser giving every subcommand ``--json`` and ``--debug``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print the results as one JSON object on the last stdout line"
    )
    common.add_argument(
        "--debug", action="store_true", help="show full tracebacks on errors, and Ray's and MLflow's own log lines"
    )
    return common


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_overrides_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: dotted config-key overrides."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)
