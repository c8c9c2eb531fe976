"""moco tune: the probe grid on shared cached features, resume, and the pretraining sweeps
(momentum with a diverging trial, mechanism x K), with the MLflow parent and nested runs; the loss
check, an interrupted sweep, and what is refused before a sweep starts."""

# ruff: noqa: F401, F811 -- the data fixtures of test_probe and test_pretrain, imported and used as arguments

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.cli_common import Interrupted
from pipelines.config import ConfigError
from pipelines.evaluate.probe_config import load_probe_config
from pipelines.tune.pretrain_sweep import loss_verdict
from pipelines.tune.probe_sweep import run_probe_sweep
from pipelines.tune.resume import resume_sweep
from pipelines.tune.sweep import SweepState, finish_sweep
from tests.pipelines.test_pretrain import TINY as PRETRAIN_TINY
from tests.pipelines.test_pretrain import tiny_shards
from tests.pipelines.test_probe import TINY as PROBE_TINY
from tests.pipelines.test_probe import colour_shards

#: One worker per trial (the CI machine has 2 cores), one epoch of 4 steps.
ONE_WORKER = [
    item
    for item in PRETRAIN_TINY
    if not item.startswith(("scaling.", "training.epochs", "eval.every_epochs", "checkpoint.every_steps"))
] + ["scaling.workers=1", "scaling.cpus_per_worker=1", "training.epochs=1", "eval.every_epochs=0"]
ONE_WORKER.append("checkpoint.every_steps=0")


def _probe_config(tmp_path, *extra):
    tracking = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    return load_probe_config("lincls", PROBE_TINY + ["optim.epochs=10", tracking, *extra])


def _client(summary):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])


def _children(client, parent_id):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in runs}


@pytest.fixture(scope="module")
def probe_sweep(ray_cluster, colour_shards, tmp_path_factory):
    """A 2-trial probe grid (lr 1 against lr 1e-8: barely off its initialisation), 1,000 epochs
    each (~1 s per 100 here) so that the trials outlast the ~1 s between their actors' starts."""
    backbone, train, val = colour_shards
    root = tmp_path_factory.mktemp("probe_sweep")
    config = _probe_config(root, "optim.epochs=1000", "optim.milestones=[800,900]")
    points = [{"optim.lr": 1.0}, {"optim.lr": 1e-8}]
    return run_probe_sweep(backbone, [train], [val], str(root / "sweep"), config, points)


def test_probe_grid_trials_share_the_features_run_concurrently_and_the_better_wins(probe_sweep):
    summary = probe_sweep
    rows = {row["trial"]: row for row in summary["rows"]}
    assert [row["status"] for row in summary["rows"]] == ["ok", "ok"]
    assert summary["best"]["trial"] == "lr=1" and rows["lr=1"]["top1"] > rows["lr=1e-08"]["top1"]
    assert rows["lr=1"]["top1"] >= 90.0 and rows["lr=1"]["epochs"] == 1000
    first, second = sorted(summary["rows"], key=lambda row: row["started"])
    assert second["started"] < first["ended"], "the two trials did not run at the same time"
    assert summary["features_reused"] is False and len(list(Path(summary["features"]).parent.iterdir())) == 1

    client = _client(summary)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_top1"] == rows["lr=1"]["top1"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "best.json", "probe_grid.png", "sweep.json"} <= artifacts
    children = _children(client, parent.info.run_id)
    assert set(children) == {"lr=1", "lr=1e-08"}
    assert children["lr=1"].data.params["optim.lr"] == "1.0"
    assert children["lr=1"].data.metrics["top1"] == rows["lr=1"]["top1"]
    output = Path(summary["output"])
    table = (output / "results.csv").read_text().splitlines()
    assert table[0].startswith("trial,optim.lr,status,top1") and len(table) == 3
    assert (output / "probe_grid.png").stat().st_size > 0


def test_an_interrupted_probe_sweep_resumes_without_rerunning_finished_trials(probe_sweep, colour_shards, tmp_path):
    backbone, train, val = colour_shards
    output = tmp_path / "sweep"
    # The same backbone and data: the features cached by the other sweep are read back.
    shutil.copytree(Path(probe_sweep["features"]).parent, output / "features")
    points = [{"optim.lr": lr} for lr in (1.0, 3.0, 10.0)]
    config = _probe_config(tmp_path)
    first = run_probe_sweep(
        backbone, [train], [val], str(output), config, points, max_concurrent=1, stop_after_trials=1
    )
    done = [row for row in first["rows"] if row["status"] == "ok"]
    assert len(done) == 1 and first["statuses"].get("pending", 0) >= 1 and first["features_reused"] is True
    resumed = resume_sweep(str(output))
    assert resumed["resumed"] is True and [row["status"] for row in resumed["rows"]] == ["ok", "ok", "ok"]
    again = next(row for row in resumed["rows"] if row["trial"] == done[0]["trial"])
    assert again["started"] == done[0]["started"]  # its result was kept, the trial not rerun
    children = _children(_client(resumed), resumed["mlflow_run_id"])
    assert sorted(children) == sorted(row["trial"] for row in resumed["rows"])  # one nested run each, no repeat


def test_momentum_sweep_reports_every_trial_and_a_diverging_one_as_fail(
    ray_cluster,
    tiny_shards,
    tmp_path,
    capsys,
):
    train, val = tiny_shards
    space = tmp_path / "space.yaml"
    # The second trial's lr makes its loss non-finite: the sweep must report it, not stop.
    space.write_text(
        "sweep: momentum\npoints:\n  - {momentum.base: 0.99}\n  - {momentum.base: 0.0, optim.lr: 1.0e+29}\n"
    )
    argv = ["tune", "momentum", "--recipe", "demo", "--data", train, "--val-data", val, "--space", str(space)]
    argv += ["--output", str(tmp_path / "sweep"), "--probe-lrs", "1", "--probe-set", "optim.epochs=5", "--json"]
    argv += [f"--set={item}" for item in ONE_WORKER + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ok, failed = summary["rows"]
    assert ok["status"] == "ok" and ok["probe_lr"] == 1.0 and isinstance(ok["top1"], float) and ok["steps"] == 4
    assert failed["status"] == "fail" and "non-finite" in failed["reason"] and failed.get("top1") is None
    assert failed["reason"].endswith("it stopped before its first checkpoint")  # not "... checkpoint is None"
    assert summary["best"]["trial"] == ok["trial"] and Path(summary["plot"]).name == "momentum.png"
    children = _children(_client(summary), summary["mlflow_run_id"])
    assert set(children) == {ok["trial"], failed["trial"]}
    diverged = children[failed["trial"]]
    assert diverged.info.status == "FAILED" and diverged.data.tags["sweep_status"] == "fail"
    assert children[ok["trial"]].data.metrics["sweep_top1"] == ok["top1"]


def test_mechanism_sweep_runs_end_to_end_and_memory_bank_and_skips_a_batch_that_does_not_fit(
    ray_cluster, tiny_shards, tmp_path
):
    """The two mechanisms no other pretraining test runs (every other one is MoCo's queue), with
    K turned into each one's own key; how a MoCo point's K becomes the queue size is in
    tests/tune_spaces/test_spaces.py."""
    from pipelines.pretrain.config import load_config
    from pipelines.tune.pretrain_sweep import TrialProbe, run_mechanism_sweep

    train, val = tiny_shards
    space = tmp_path / "space.yaml"
    space.write_text(
        "sweep: mechanism\npoints:\n  - {mechanism: end_to_end, k: 8}\n  - {mechanism: memory_bank, k: 16}\n"
        "  - {mechanism: end_to_end, k: 64}\n"
    )
    config = load_config("demo", ONE_WORKER + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    summary = run_mechanism_sweep(config, [train], [val], str(tmp_path / "sweep"), str(space), probe=TrialProbe("knn"))
    rows = {(row["mechanism"], row["k"]): row for row in summary["rows"]}
    assert {key: row["status"] for key, row in rows.items()} == {
        ("end_to_end", 8): "ok",
        ("memory_bank", 16): "ok",
        ("end_to_end", 64): "skipped",  # a batch of 64 does not fit 32 training images
    }
    assert all(isinstance(rows[key]["top1"], float) for key in [("end_to_end", 8), ("memory_bank", 16)])
    params = {name: run.data.params for name, run in _children(_client(summary), summary["mlflow_run_id"]).items()}
    assert params["mechanism=end_to_end,k=8"]["optim.batch_size"] == "8"
    assert params["mechanism=end_to_end,k=8"]["model.mechanism"] == "end_to_end"
    assert params["mechanism=memory_bank,k=16"]["model.queue_size"] == "16"
    assert params["mechanism=memory_bank,k=16"]["model.mechanism"] == "memory_bank"
    assert Path(summary["plot"]).name == "mechanism_k.png"


# ------------------------------------------------------------------------------ without Ray


@pytest.mark.parametrize(
    "losses",
    [
        [0.215, 4.67, 5.20, 5.24],  # a 4-step momentum trial: low at first, rising as the queue fills
        [0.5, 4.0, 3.95, 4.3],  # nearly monotone: one small dip
    ],
)
def test_a_curved_rise_is_not_an_oscillation(losses):
    verdict, why = loss_verdict(losses)
    assert verdict == "ok", why


@pytest.mark.parametrize(
    "losses",
    [
        [6.0, 8.0, 6.0, 8.0, 6.0, 8.0, 6.0, 8.0],  # up and down, no progress (the paper's small m)
        [5.0, 7.0, 5.5, 7.5, 6.0, 8.0, 6.5, 8.5],  # swinging about a rising trend
    ],
)
def test_a_loss_swinging_up_and_down_oscillates(losses):
    verdict, why = loss_verdict(losses)
    assert verdict == "fail" and "oscillates" in why
    assert loss_verdict(losses, tolerance=0.2)[0] == "ok"  # within a looser --oscillation-tolerance


def _state(tmp_path):
    return SweepState("probe", str(tmp_path), ({"optim.lr": 1.0}, {"optim.lr": 3.0}), {}, None, "", False, False, {})


def test_a_sweep_left_with_pending_trials_writes_its_table_and_raises_interrupted(tmp_path):
    rows = [{"trial": "lr=1", "status": "ok", "top1": 50.0}, {"trial": "lr=3", "status": "pending"}]
    with pytest.raises(
        Interrupted, match=f"1 of 2 trials unfinished.*moco tune probe --resume {re.escape(str(tmp_path))}$"
    ):
        finish_sweep(_state(tmp_path), rows, ["trial", "status", "top1"], lambda output, rows: None, 0.0)
    assert "| lr=3 | pending |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["statuses"] == {"ok": 1, "pending": 1}
    # stop_after_trials (a test's stand-in for Ctrl-C) returns the summary instead
    summary = finish_sweep(_state(tmp_path), rows, ["trial", "status"], lambda output, rows: None, 0.0, None, True)
    assert summary["statuses"] == {"ok": 1, "pending": 1}


@pytest.fixture
def ray_never_started(monkeypatch):
    """A command that starts Ray fails with 'Ray was started' instead."""

    def refuse() -> bool:
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pipelines.ray_runtime.ensure_ray", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--probe-lrs=-3"], "--probe-lrs: lr=-3.0 is invalid: expected > 0"),
        (["--probe-lrs", "-3,10"], "--probe-lrs: lr=-3.0 is invalid: expected > 0"),
        (
            ["--oscillation-tolerance=-1"],
            "--oscillation-tolerance -1: expected a share of the loss's mean >= 0, e.g. 0.05",
        ),
        (
            ["--probe-set", "optim.epochs=0"],
            "the probe's config (--probe-recipe, --probe-set): optim.epochs=0 is invalid: expected >= 1",
        ),
    ],
)
def test_bad_probe_settings_of_a_pretraining_sweep_are_refused_before_ray_starts(
    extra, message, ray_never_started, tiny_shards, tmp_path, capsys
):
    train, val = tiny_shards
    argv = ["tune", "momentum", "--recipe", "demo", "--data", train, "--val-data", val, "--values", "0.9"]
    assert main([*argv, "--output", str(tmp_path / "sweep"), *extra]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"moco: error: {message}"
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sweep", ["momentum", "mechanism"])
def test_a_pretraining_sweep_into_a_directory_holding_one_is_refused_before_ray_starts(
    sweep, ray_never_started, tiny_shards, tmp_path, capsys
):
    train, val = tiny_shards
    (tmp_path / "sweep.json").write_text(json.dumps({"kind": sweep}))
    argv = ["tune", sweep, "--recipe", "demo", "--data", train, "--val-data", val, "--output", str(tmp_path)]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moco: error: {tmp_path} already holds a sweep; continue it with --resume {tmp_path} or give a new --output"
    )


def test_negative_numbers_are_read_as_an_option_value(ray_never_started, colour_shards, tmp_path, capsys):
    backbone, train, val = colour_shards
    argv = ["tune", "probe", "--backbone", backbone, "--train", train, "--val", val, "--output", str(tmp_path)]
    assert main([*argv, "--lrs", "-1,10", "--weight-decays", "0"]) == 1  # not argparse's 'expected one argument'
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moco: error: probe space point {'optim.lr': -1.0, 'optim.weight_decay': 0.0}: "
        "optim.lr=-1.0 is invalid: expected > 0"
    )


# ------------------------------------------------------------------------------ with Ray


@pytest.mark.timeout(120)  # before the check, the sweep waited for ever for the GPU
def test_trials_this_machine_cannot_take_are_refused_before_the_sweep_starts(
    ray_cluster, colour_shards, tiny_shards, tmp_path, capsys, monkeypatch
):
    # The shared 2-CPU cluster stands for a local one the command started: nothing more will join.
    monkeypatch.setattr("pipelines.ray_runtime.ensure_ray", lambda: True)
    backbone, train, val = colour_shards
    with pytest.raises(ConfigError, match="^--gpus-per-trial 1: a trial asks for 1 GPUs and this machine has 0;"):
        run_probe_sweep(backbone, [train], [val], str(tmp_path / "probe"), _probe_config(tmp_path), gpus_per_trial=1)
    pretrain_train, pretrain_val = tiny_shards
    argv = ["tune", "momentum", "--recipe", "demo", "--data", pretrain_train, "--val-data", pretrain_val]
    argv += ["--values", "0.9", "--gpus-per-worker", "1", "--output", str(tmp_path / "momentum")]
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("moco: error: the trainer asks for 1 GPUs and this machine has 0;")
    assert not (tmp_path / "probe").exists() and not (tmp_path / "momentum").exists()
