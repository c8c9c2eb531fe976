"""The installed ``moco`` console script: the product's commands plus ``moco bench``.

The composition lives here, in the one layer that may see both: ``benchmarks`` imports
``pipelines`` to measure it, and ``pipelines`` never imports ``benchmarks``
(``tests/pipelines/test_imports.py`` checks it). ``python -m pipelines.cli`` runs the product's
commands alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks import cli as bench_cli
from pipelines import cli

COMMANDS: tuple[cli.Registrar, ...] = (*cli.PRODUCT_COMMANDS, bench_cli.register)


def main(argv: Sequence[str] | None = None) -> int:
    """``moco``: every command, benchmarks included; returns the exit status."""
    return cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
