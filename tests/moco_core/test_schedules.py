import math

import pytest

from moco_core.schedules import (
    CosineSchedule,
    CosineToOneSchedule,
    ExponentialSchedule,
    LinearWarmup,
    StepSchedule,
    build_lr_schedule,
    build_momentum_schedule,
    linear_scaled_lr,
)


def test_step_schedule_at_milestones():
    schedule = StepSchedule(0.03, milestones=(120, 160), gamma=0.1)
    assert schedule(0) == pytest.approx(0.03)
    assert schedule(119) == pytest.approx(0.03)
    assert schedule(120) == pytest.approx(0.003)
    assert schedule(159) == pytest.approx(0.003)
    assert schedule(160) == pytest.approx(0.0003)


def test_cosine_schedule_endpoints_and_midpoint():
    schedule = CosineSchedule(0.06, total_steps=100)
    assert schedule(0) == pytest.approx(0.06)
    assert schedule(50) == pytest.approx(0.03)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)
    assert schedule(150) == pytest.approx(0.0, abs=1e-12)


def test_exponential_schedule_is_the_ig1b_recipe():
    schedule = ExponentialSchedule(0.12, gamma=0.9, every=62_500)
    assert schedule(62_499) == pytest.approx(0.12)
    assert schedule(62_500) == pytest.approx(0.108)
    assert schedule(1_249_999) == pytest.approx(0.12 * 0.9**19)


def test_linear_warmup_ramps_to_the_inner_schedule():
    schedule = LinearWarmup(StepSchedule(0.1, milestones=(50,)), warmup_steps=10)
    assert schedule(0) == pytest.approx(0.0)
    assert schedule(5) == pytest.approx(0.05)
    assert schedule(10) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.01)


def test_cosine_momentum_rises_to_one():
    schedule = CosineToOneSchedule(0.99, total_steps=1000)
    assert schedule(0) == pytest.approx(0.99)
    assert schedule(500) == pytest.approx(0.995)
    assert schedule(1000) == pytest.approx(1.0)


def test_linear_scaling_rule():
    assert linear_scaled_lr(0.03, 128) == pytest.approx(0.015)
    assert linear_scaled_lr(0.03, 1024) == pytest.approx(0.12)


def test_builders_by_name():
    assert build_lr_schedule("cosine", 0.1, 10)(5) == pytest.approx(0.05)
    assert build_lr_schedule("step", 0.1, 10, milestones=[3])(3) == pytest.approx(0.01)
    assert build_lr_schedule("exponential", 1.0, 10, gamma=0.5, every=2)(4) == pytest.approx(0.25)
    assert build_lr_schedule("constant", 0.2, 10, warmup_steps=4)(2) == pytest.approx(0.1)
    assert build_momentum_schedule("constant", 0.999, 10)(7) == 0.999
    assert math.isclose(build_momentum_schedule("cosine", 0.9, 10)(10), 1.0)
    with pytest.raises(ValueError, match="lr schedule"):
        build_lr_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="momentum"):
        build_momentum_schedule("constant", 1.5, 10)
