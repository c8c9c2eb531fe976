"""What every space shares: grids expanded to points, YAML space files, the Tune ``param_space``
and a trial's name."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError

#: Top-level keys of a space file besides sweep-specific settings.
SPACE_KEYS = ("sweep", "grid", "points")

Point = dict[str, Any]


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Every combination of the grid's values, the first key varying slowest.

    Raises:
        ConfigError: a key whose values are not a non-empty list.
    """
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"space grid key {key}: expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(grid[key] for key in keys))]


def expand_space(space: Mapping[str, Any]) -> list[Point]:
    """The points of a space mapping: its ``grid``'s combinations, then its ``points``, duplicates dropped."""
    points = grid_points(space.get("grid") or {}) if space.get("grid") else []
    for point in space.get("points") or []:
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(f"space points: expected a mapping of config keys to values, got {point!r}")
        points.append(dict(point))
    unique: list[Point] = []
    for point in points:
        if point not in unique:
            unique.append(point)
    if not unique:
        raise ConfigError("the space has no trials: give a 'grid' or 'points'")
    return unique


def load_space(name_or_path: str, sweep: str, builtins: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A space mapping (``grid``, ``points`` and the sweep's own settings) by built-in name or YAML path.

    Args:
        name_or_path: a key of ``builtins`` or a ``.yaml`` / ``.yml`` file.
        sweep: the sweep asking (a file naming another sweep is refused).
        builtins: the sweep's built-in spaces.

    Raises:
        ConfigError: unknown name, missing or malformed file, a file for another sweep.
    """
    if name_or_path in builtins:
        return dict(builtins[name_or_path])
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        known = ", ".join(sorted(builtins))
        raise ConfigError(f"unknown {sweep} space {name_or_path!r}; built-in: {known}; or a YAML path")
    if not path.is_file():
        raise ConfigError(f"space file {name_or_path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"space file {name_or_path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"space file {name_or_path}: expected a mapping with 'grid' and/or 'points'")
    if data.get("sweep", sweep) != sweep:
        raise ConfigError(f"space file {name_or_path} is for 'moco tune {data['sweep']}', not 'moco tune {sweep}'")
    return data


def param_space(points: Sequence[Point]) -> dict[str, Any]:
    """The Tune ``param_space``: one trial per point, under the key ``trial``."""
    from ray import tune

    return {"trial": tune.grid_search(list(points))}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_short(item) for item in value)
    return str(value)


#: Short names of the keys sweeps vary most; other keys are named by their last part.
SHORT_NAMES = {"momentum.base": "m", "optim.weight_decay": "wd", "model.queue_size": "queue"}


def trial_name(point: Point) -> str:
    """A readable, filesystem-safe name: ``lr=0.1,wd=1e-05``, ``m=0.999``, ``mechanism=moco,k=4096``."""
    parts = [f"{SHORT_NAMES.get(key, key.rsplit('.', 1)[-1])}={_short(value)}" for key, value in point.items()]
    return ",".join(parts).replace("/", "_").replace(" ", "")


def check_keys(points: Sequence[Point], allowed: Sequence[str], sweep: str) -> None:
    """Every point's keys start with one of ``allowed`` (a key or a ``section.`` prefix)."""
    for point in points:
        for key in point:
            if not any(key == prefix or (prefix.endswith(".") and key.startswith(prefix)) for prefix in allowed):
                raise ConfigError(
                    f"{sweep} space key {key!r} is not swept by this command; allowed: {', '.join(allowed)}"
                )
