"""The linear-probe grid (``moco tune probe``): the fc layer's lr x weight decay on cached features.

The default grid, ``lincls``, brackets the official ``main_lincls.py`` setting (lr 30, no weight
decay) by half-decades of lr and decades of weight decay: lr in {0.1, 0.3, 1, 3, 10, 30, 100},
weight decay in {0, 1e-6, 1e-5, 1e-4}, 28 trials. A space file may also sweep ``optim.batch_size``,
``optim.epochs`` or any other ``optim.*`` key of the probe config, and ``training.seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tune_spaces.common import Point, check_keys, expand_space, load_space, param_space

LRS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4)

#: Built-in spaces (``--space NAME``).
SPACES: dict[str, dict[str, Any]] = {
    "lincls": {"grid": {"optim.lr": list(LRS), "optim.weight_decay": list(WEIGHT_DECAYS)}},
    "lr": {"grid": {"optim.lr": list(LRS)}},
}
DEFAULT_SPACE = "lincls"
#: Probe config keys a probe space may vary.
SWEPT_KEYS = ("optim.", "training.seed")


def probe_grid_points(
    space: str = DEFAULT_SPACE,
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
) -> list[Point]:
    """The trials of a probe space, with the lr / weight-decay axes replaced when given.

    Raises:
        ConfigError: unknown space, a malformed file, a key the probe grid does not sweep.
    """
    data = load_space(space, "probe", SPACES)
    grid = dict(data.get("grid") or {})
    if lrs:
        grid["optim.lr"] = list(lrs)
    if weight_decays:
        grid["optim.weight_decay"] = list(weight_decays)
    points = expand_space({**data, "grid": grid})
    check_keys(points, SWEPT_KEYS, "probe")
    return points


def probe_grid_space(space: str = DEFAULT_SPACE) -> dict[str, Any]:
    """The Tune ``param_space`` of a probe space."""
    return param_space(probe_grid_points(space))
