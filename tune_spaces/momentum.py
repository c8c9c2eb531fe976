"""The momentum sweep (``moco tune momentum``): one pretraining run per key-encoder momentum m.

The default, ``paper``, is the paper's Table (sec. 4.1, "Ablation: momentum"): m in
{0, 0.9, 0.99, 0.999, 0.9999}; the paper reports 0.99-0.999 best and m=0 failing to train. A space
file may add other pretraining keys (``optim.lr``, ``training.epochs``, ...), or give points one by
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tune_spaces.common import Point, check_keys, expand_space, load_space, param_space

VALUES: tuple[float, ...] = (0.0, 0.9, 0.99, 0.999, 0.9999)
#: The small lr grid of the cached probe run on every trial's backbone.
PROBE_LRS: tuple[float, ...] = (3.0, 10.0, 30.0)

SPACES: dict[str, dict[str, Any]] = {"paper": {"grid": {"momentum.base": list(VALUES)}}}
DEFAULT_SPACE = "paper"
#: Pretraining config sections a momentum space may vary.
SWEPT_KEYS = ("momentum.", "optim.", "training.", "model.", "augment.")


def momentum_points(space: str = DEFAULT_SPACE, values: Sequence[float] | None = None) -> list[Point]:
    """The trials of a momentum space; ``values`` replaces its ``momentum.base`` axis.

    Raises:
        ConfigError: unknown space, a malformed file, a key the sweep does not vary.
    """
    data = load_space(space, "momentum", SPACES)
    grid = dict(data.get("grid") or {})
    if values:
        grid["momentum.base"] = list(values)
    points = expand_space({**data, "grid": grid})
    check_keys(points, SWEPT_KEYS, "momentum")
    return points


def momentum_space(values: Sequence[float] = VALUES) -> dict[str, Any]:
    """The Tune ``param_space`` of the momentum sweep over ``values``."""
    return param_space(momentum_points(DEFAULT_SPACE, values))
