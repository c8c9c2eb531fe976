"""Per-iteration schedules for the learning rate and the encoder momentum.

Schedules are plain callables ``step -> value`` computed outside the model and passed into
each training step, so a sweep varies data, not code. Steps count optimizer iterations from 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class ConstantSchedule:
    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class StepSchedule:
    """``base * gamma**(number of milestones <= step)``: the IN-1M recipe (x0.1 at epochs 120, 160)."""

    base: float
    milestones: Sequence[int]
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        return self.base * self.gamma ** sum(step >= milestone for milestone in self.milestones)


@dataclass(frozen=True)
class CosineSchedule:
    """Half-cosine from ``base`` at step 0 to ``final`` at ``total_steps`` (held after)."""

    base: float
    total_steps: int
    final: float = 0.0

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / max(self.total_steps, 1)
        return self.final + (self.base - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ExponentialSchedule:
    """``base * gamma**floor(step / every)``: the IG-1B recipe (x0.9 every 62.5k iterations)."""

    base: float
    gamma: float
    every: int

    def __call__(self, step: int) -> float:
        return self.base * self.gamma ** (step // self.every)


@dataclass(frozen=True)
class LinearWarmup:
    """Linear ramp from ``start`` to ``inner(warmup_steps)`` over ``warmup_steps``, then ``inner``."""

    inner: Schedule
    warmup_steps: int
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.inner(step)
        target = self.inner(self.warmup_steps)
        return self.start + (target - self.start) * step / self.warmup_steps


@dataclass(frozen=True)
class CosineToOneSchedule:
    """Momentum rising from ``base`` to 1 along a half-cosine (BYOL / MoCo v3 style)."""

    base: float
    total_steps: int

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / max(self.total_steps, 1)
        return 1.0 - (1.0 - self.base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int = 256) -> float:
    """The linear scaling rule: lr grows in proportion to the global batch size (Goyal et al. 2017)."""
    return base_lr * batch_size / reference_batch_size


def build_lr_schedule(
    kind: str,
    base: float,
    total_steps: int,
    *,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    every: int = 1,
    warmup_steps: int = 0,
) -> Schedule:
    """Build a learning-rate schedule by name: ``constant``, ``step``, ``cosine`` or ``exponential``."""
    inner: Schedule
    if kind == "constant":
        inner = ConstantSchedule(base)
    elif kind == "step":
        inner = StepSchedule(base, tuple(milestones), gamma)
    elif kind == "cosine":
        inner = CosineSchedule(base, total_steps)
    elif kind == "exponential":
        if every < 1:
            raise ValueError(f"exponential schedule needs every >= 1, got {every}")
        inner = ExponentialSchedule(base, gamma, every)
    else:
        raise ValueError(f"unknown lr schedule {kind!r}; choose constant, step, cosine or exponential")
    return LinearWarmup(inner, warmup_steps) if warmup_steps > 0 else inner


def build_momentum_schedule(kind: str, base: float, total_steps: int) -> Schedule:
    """Build the encoder-momentum schedule by name: ``constant`` or ``cosine`` (to 1)."""
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {base}")
    if kind == "constant":
        return ConstantSchedule(base)
    if kind == "cosine":
        return CosineToOneSchedule(base, total_steps)
    raise ValueError(f"unknown momentum schedule {kind!r}; choose constant or cosine")
