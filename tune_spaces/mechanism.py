"""The mechanism x K sweep (``moco tune mechanism``): the paper's Figure 3.

Three ways of keeping a dictionary of K negatives: ``end_to_end`` (keys from the query encoder,
with gradients; K is the batch), ``memory_bank`` (K negatives drawn from a bank of every image's
last feature) and ``moco`` (a queue of K keys from the momentum encoder). A point is
``{"mechanism": ..., "k": K}``; :func:`mechanism_overrides` turns it into config keys:
``model.mechanism`` and ``model.queue_size=K``, or for ``end_to_end`` ``optim.batch_size=K``.
End-to-end's K is bounded by what fits in memory (the paper stops at 1024 on 8 GPUs):
``end_to_end_max_batch`` in the space (default 1024) and the training set's size drop the larger
points, as the paper's curve stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.config import ConfigError
from tune_spaces.common import Point, check_keys, expand_space, load_space, param_space

MECHANISMS: tuple[str, ...] = ("end_to_end", "memory_bank", "moco")
KS: tuple[int, ...] = (256, 1024, 4096, 16384)
END_TO_END_MAX_BATCH = 1024

SPACES: dict[str, dict[str, Any]] = {
    "paper": {"grid": {"mechanism": list(MECHANISMS), "k": list(KS)}, "end_to_end_max_batch": END_TO_END_MAX_BATCH},
    "paper-full": {
        "grid": {"mechanism": list(MECHANISMS), "k": [256, 512, 1024, 4096, 16384, 65536]},
        "end_to_end_max_batch": END_TO_END_MAX_BATCH,
    },
}
DEFAULT_SPACE = "paper"
SWEPT_KEYS = ("mechanism", "k", "momentum.", "optim.", "training.", "model.", "augment.")


def mechanism_overrides(point: Point) -> dict[str, Any]:
    """The config keys of a point: ``mechanism`` and ``k`` translated, other keys as they are."""
    rest = {key: value for key, value in point.items() if key not in ("mechanism", "k")}
    mechanism, k = point["mechanism"], int(point["k"])
    size_key = "optim.batch_size" if mechanism == "end_to_end" else "model.queue_size"
    return {"model.mechanism": mechanism, size_key: k, **rest}


def mechanism_points(
    space: str = DEFAULT_SPACE,
    ks: Sequence[int] | None = None,
    mechanisms: Sequence[str] | None = None,
    num_images: int | None = None,
    end_to_end_max_batch: int | None = None,
) -> tuple[list[Point], list[dict[str, Any]]]:
    """(trials, dropped points with the reason) of a mechanism space.

    Args:
        space: a built-in name or a YAML file (``grid`` of ``mechanism`` and ``k``).
        ks, mechanisms: replace the space's axes when given.
        num_images: the training set's size (an end-to-end batch cannot exceed it).
        end_to_end_max_batch: the largest end-to-end batch tried (default: the space's, else 1024).

    Raises:
        ConfigError: unknown space or mechanism, a malformed file, K < 1.
    """
    data = load_space(space, "mechanism", SPACES)
    grid = dict(data.get("grid") or {})
    if ks:
        grid["k"] = list(ks)
    if mechanisms:
        grid["mechanism"] = list(mechanisms)
    points = expand_space({**data, "grid": grid})
    check_keys(points, SWEPT_KEYS, "mechanism")
    limit = end_to_end_max_batch or int(data.get("end_to_end_max_batch", END_TO_END_MAX_BATCH))
    kept, dropped = [], []
    for point in points:
        if point.get("mechanism") not in MECHANISMS or "k" not in point:
            raise ConfigError(
                f"mechanism space point {point}: needs 'mechanism' (one of {', '.join(MECHANISMS)}) and 'k'"
            )
        if int(point["k"]) < 1:
            raise ConfigError(f"mechanism space point {point}: k must be >= 1")
        if point["mechanism"] == "end_to_end" and int(point["k"]) > limit:
            dropped.append({**point, "reason": f"end-to-end batch {point['k']} above end_to_end_max_batch={limit}"})
        elif point["mechanism"] == "end_to_end" and num_images is not None and int(point["k"]) > num_images:
            dropped.append({**point, "reason": f"end-to-end batch {point['k']} above the {num_images} training images"})
        else:
            kept.append(point)
    if not kept:
        raise ConfigError("the mechanism space has no trial that fits (every point was dropped)")
    return kept, dropped


def mechanism_space(ks: Sequence[int] = KS, num_images: int | None = None) -> dict[str, Any]:
    """The Tune ``param_space`` of the mechanism sweep over ``ks``."""
    return param_space(mechanism_points(DEFAULT_SPACE, ks, num_images=num_images)[0])
