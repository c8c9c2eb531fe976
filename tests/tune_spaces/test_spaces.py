"""The sweeps' spaces: the paper's grids, space files, and which mechanism x K points fit."""

import math

import pytest

from pipelines.config import ConfigError
from pipelines.pretrain.config import load_config
from pipelines.tune.pretrain_sweep import chance_loss, loss_verdict
from tune_spaces.common import param_space, trial_name
from tune_spaces.mechanism import mechanism_overrides, mechanism_points
from tune_spaces.momentum import momentum_points
from tune_spaces.probe_grid import probe_grid_points


def test_built_in_spaces_are_the_issue_and_paper_grids():
    probe = probe_grid_points()
    assert len(probe) == 7 * 4 and probe[0] == {"optim.lr": 0.1, "optim.weight_decay": 0.0}
    assert {point["optim.lr"] for point in probe} == {0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0}
    assert {point["optim.weight_decay"] for point in probe} == {0.0, 1e-6, 1e-5, 1e-4}
    assert [point["momentum.base"] for point in momentum_points()] == [0.0, 0.9, 0.99, 0.999, 0.9999]
    assert [point["optim.lr"] for point in probe_grid_points(lrs=[1, 10])[:2]] == [1, 1]
    assert param_space(momentum_points(values=[0.99]))["trial"] == {"grid_search": [{"momentum.base": 0.99}]}


def test_end_to_end_runs_only_the_batches_that_fit():
    points, dropped = mechanism_points(num_images=2000)
    run = {(point["mechanism"], point["k"]) for point in points}
    assert ("end_to_end", 256) in run and ("end_to_end", 1024) in run and ("end_to_end", 4096) not in run
    assert {("moco", k) for k in (256, 1024, 4096, 16384)} <= run and ("memory_bank", 16384) in run
    assert {point["k"] for point in dropped} == {4096, 16384} and "end_to_end_max_batch=1024" in dropped[0]["reason"]
    small, dropped_small = mechanism_points(ks=[256, 1024], mechanisms=["end_to_end"], num_images=500)
    assert small == [{"mechanism": "end_to_end", "k": 256}] and "500 training images" in dropped_small[0]["reason"]
    assert mechanism_overrides({"mechanism": "end_to_end", "k": 256}) == {
        "model.mechanism": "end_to_end",
        "optim.batch_size": 256,
    }
    assert mechanism_overrides({"mechanism": "moco", "k": 4096, "optim.lr": 0.1}) == {
        "model.mechanism": "moco",
        "model.queue_size": 4096,
        "optim.lr": 0.1,
    }


def test_space_files_give_grids_and_points_for_their_own_sweep(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "sweep: probe\ngrid:\n  optim.lr: [1, 10]\n  optim.batch_size: [64, 128]\n"
        "points:\n  - {optim.lr: 30, optim.weight_decay: 1.0e-4}\n"
    )
    points = probe_grid_points(str(path))
    assert len(points) == 5 and points[-1] == {"optim.lr": 30, "optim.weight_decay": 1e-4}
    assert trial_name(points[-1]) == "lr=30,wd=0.0001"
    assert trial_name({"momentum.base": 0.999}) == "m=0.999"
    with pytest.raises(ConfigError, match="for 'moco tune probe', not 'moco tune momentum'"):
        momentum_points(str(path))
    path.write_text("grid:\n  model.arch: [resnet50]\n")
    with pytest.raises(ConfigError, match="probe space key 'model.arch' is not swept"):
        probe_grid_points(str(path))
    with pytest.raises(ConfigError, match="unknown momentum space 'nope'; built-in: paper"):
        momentum_points("nope")
    with pytest.raises(ConfigError, match="space file missing.yaml does not exist"):
        probe_grid_points("missing.yaml")


@pytest.mark.parametrize(
    "losses, status, why",
    [
        ([9.0, 8.0, 7.5, 7.0, 6.8, 6.5, 6.3, 6.2], "ok", "slope -"),  # still falling
        ([9.0, 7.0, 6.0, 6.0, 6.01, 6.0, 6.01, 6.0], "ok", "swing 0%"),  # a smooth plateau
        ([9.0, 8.0, 6.0, 8.5, 5.5, 8.8, 5.2, 9.0], "fail", "oscillates"),  # swings, no progress
        ([9.0, 8.0, 7.0, 6.0, 8.0, 6.5, 9.5, 7.0], "fail", "oscillates"),  # up and down, no progress
        ([3.4, 3.1, 3.0, 3.6, 4.5, 4.8, 5.1, 5.6], "ok", "slope +"),  # a smooth rise (the queue filling)
        ([9.0, 8.0, float("nan")], "fail", "non-finite"),
        ([9.0, 9.5, 10.0], "ok", "not judged"),
    ],
)
def test_the_divergence_rule(losses, status, why):
    verdict, reason = loss_verdict(losses)
    assert verdict == status and why in reason


#: The logged losses of the demo's m=0 trial (docs/RESULTS.md): up from 4.1 to ln(1025) and flat.
COLLAPSED_AT_M0 = [4.095, 5.945, 6.111, 6.568, 6.786, 6.829, 6.875, 6.915, 6.925, 6.929, 6.932, 6.932]
#: Its m=0.9 neighbour: still rising as the queue fills with real keys, well below chance.
RISING_AT_M09 = [3.405, 3.057, 3.044, 3.624, 4.497, 4.78, 5.123, 5.623, 5.743]


def test_a_loss_that_collapses_to_chance_fails():
    chance = chance_loss(load_config("demo", ["model.mechanism=moco", "model.queue_size=1024"]))
    assert chance == pytest.approx(math.log(1025))
    assert loss_verdict(COLLAPSED_AT_M0)[0] == "ok"  # it does not oscillate: rule 2 alone misses it
    verdict, reason = loss_verdict(COLLAPSED_AT_M0, chance=chance)
    assert verdict == "fail" and "collapsed to chance" in reason and "6.932" in reason
    assert loss_verdict(RISING_AT_M09, chance=chance)[0] == "ok"
    end_to_end = load_config("demo", ["model.mechanism=end_to_end", "optim.batch_size=64"])
    assert chance_loss(end_to_end) == pytest.approx(math.log(64))


#: The demo's memory bank at K=64 (docs/RESULTS.md): far above chance (4.174) at first, as its
#: positives are random bank entries, and falling: learning (kNN 61.3 -> 67.7), not collapsed.
MEMORY_BANK_K64 = [9.36, 10.41, 9.85, 7.40, 8.29, 8.81, 4.59, 4.95, 5.15, 5.33, 4.30, 4.34]


def test_a_loss_above_chance_is_not_collapse():
    chance = chance_loss(load_config("demo", ["model.mechanism=memory_bank", "model.queue_size=64"]))
    assert chance == pytest.approx(math.log(65))
    verdict, reason = loss_verdict(MEMORY_BANK_K64, chance=chance)
    assert verdict == "ok", reason
    # A window averaging at chance from above (within 0.5%) is collapse all the same.
    assert loss_verdict([chance * 1.004] * 4, chance=chance)[0] == "fail"
