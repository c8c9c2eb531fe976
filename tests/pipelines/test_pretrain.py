"""The pretraining job end to end on 2 CPU workers: DDP, queue, failures, resume, MLflow."""

import json
import math
import platform
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.ingest.shards import build_shards
from pipelines.pretrain.checkpoints import POINTER_NAME, list_checkpoints, newest_intact_checkpoint, read_pointer
from pipelines.pretrain.config import load_config
from pipelines.pretrain.driver import RunFailed, _finished_as_configured, load_run_for_resume, run_pretraining
from tests.pipelines.fixtures import TINY_PRETRAIN as TINY
from tests.pipelines.fixtures import write_image_folder


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    write_image_folder(root / "train", {"a": 16, "b": 16}, start_seed=0)
    write_image_folder(root / "val", {"a": 6, "b": 6}, start_seed=100)
    build_shards([root / "train"], root / "shards_train", row_group_size=8, workers=1, show_progress=False)
    build_shards([root / "val"], root / "shards_val", row_group_size=8, workers=1, show_progress=False)
    return str(root / "shards_train"), str(root / "shards_val")


def _config(tmp_path, *extra):
    return load_config("demo", TINY + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra])


def _checkpoint_model(summary) -> dict:
    return torch.load(Path(summary["checkpoint"]) / "model.pt", weights_only=True)["model"]


def test_two_worker_pretraining_end_to_end_with_mlflow(ray_cluster, tiny_shards, tmp_path):
    import mlflow

    train, val = tiny_shards
    summary = run_pretraining(_config(tmp_path), [train], str(tmp_path / "run"), val_data=[val])
    assert summary["steps"] == summary["total_steps"] == 2 * (32 // 8)
    assert summary["images_seen"] == 8 * summary["steps"]
    assert summary["queue_identical_across_workers"] is True
    for knn in (summary["knn_top1"], summary["knn_top1_random_init"]):  # accuracies over the 12 val images
        assert knn * 12 / 100 == pytest.approx(round(knn * 12 / 100), abs=1e-6)
    assert summary["skipped_images"] == 0 and "stopped" not in summary
    assert summary["host_memory_reused"] is (platform.libc_ver()[0] == "glibc")  # training.host_allocator=reuse
    assert (summary["epochs_completed"], summary["epochs_planned"]) == (2, 2.0)
    state = _checkpoint_model(summary)
    assert int(state["queue.pointer"]) == (summary["steps"] * 8) % 40
    query_keys = {key.removeprefix("query_encoder.") for key in state if key.startswith("query_encoder.")}
    momentum_keys = {key.removeprefix("momentum_encoder.") for key in state if key.startswith("momentum_encoder.")}
    assert query_keys == momentum_keys and "backbone.conv1.weight" in query_keys
    backbone = torch.load(summary["backbone"], weights_only=True)
    assert "conv1.weight" in backbone and not any(key.startswith("fc.") for key in backbone)

    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.batch_size"] == "8" and run.data.params["scaling.workers"] == "2"
    assert summary["precision"] == run.data.tags["precision"] == "fp32"  # what it trained in, for comparing runs
    for metric in (
        "loss",
        "pretext_top1",
        "lr",
        "momentum",
        "images_per_s",
        "data_wait_fraction",
        "skipped_images",
        "knn_top1",
    ):
        assert metric in run.data.metrics, metric
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
    knn_history = client.get_metric_history(run.info.run_id, "knn_top1")
    assert [point.step for point in knn_history] == [4, 8] and knn_history[-1].value == summary["knn_top1"]
    lr_points = client.get_metric_history(run.info.run_id, "lr")
    assert lr_points[-1].value == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))  # cosine at step 7
    assert all(point.value == 0.99 for point in client.get_metric_history(run.info.run_id, "momentum"))
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "backbone.pt", "curves.png", "metrics.jsonl", "checkpoint"} <= artifacts
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == summary["steps"]

    # Resuming the finished run says so at once: no data is planned (this data does not exist).
    complete = run_pretraining(_config(tmp_path), [str(tmp_path / "gone")], str(tmp_path / "run"), resume=True)
    assert complete == {
        "already_complete": True,
        "steps": 8,
        "total_steps": 8,
        "output": str(tmp_path / "run"),
        "checkpoint": summary["checkpoint"],
    }
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    # A run stopped after its final checkpoint but before finishing: resuming writes what it lacked.
    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "backbone.pt").unlink()
    finished = run_pretraining(_config(tmp_path), [str(tmp_path / "gone")], str(tmp_path / "run"), resume=True)
    assert finished["already_complete"] and finished["mlflow_run_id"] == summary["mlflow_run_id"]
    assert finished["final_loss"] == summary["final_loss"]
    assert torch.load(finished["backbone"], weights_only=True).keys() == backbone.keys()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == finished
    restore = newest_intact_checkpoint(list_checkpoints(str(tmp_path / "run")))
    extended, _ = load_run_for_resume(str(tmp_path / "run"), ["training.epochs=3"])
    assert _finished_as_configured(restore, _config(tmp_path)) and not _finished_as_configured(restore, extended)


def _trained_images(run_dir: Path) -> list[tuple[int, int]]:
    """(epoch, index) of every image trained on, by the attempt that counted (debug.record_batches):
    a step recorded again after a restart replaces the failed attempt's record of it."""
    final: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for path in sorted(run_dir.glob("debug_batches_rank*.jsonl")):
        rank = int(path.stem.removeprefix("debug_batches_rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            final[(rank, record["step"])] = list(zip(record["epoch"], record["index"]))
    return [image for images in final.values() for image in images]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--set", "optim.lrr=0.1"], "unknown key optim.lrr"),
        (["--set", "optim.lr=-1"], "optim.lr=-1.0 is invalid"),
        (["--set", "model.arch=vgg"], "model.arch='vgg' is invalid"),
        (["--workers", "3"], "multiple of scaling.workers=3"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
    ],
)
def test_bad_configs_are_rejected_before_ray_starts(arguments, message, tmp_path, capsys):
    import ray

    recipe = [] if "--recipe" in arguments else ["--recipe", "demo"]
    argv = ["pretrain", *recipe, "--data", str(tmp_path), "--output", str(tmp_path / "out"), *arguments]
    was_running = ray.is_initialized()
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and "Traceback" not in error[0]
    assert ray.is_initialized() == was_running


def test_resume_with_output_and_an_output_that_is_a_file_are_refused_before_ray_starts(tmp_path, capsys):
    import ray

    was_running = ray.is_initialized()
    assert main(["pretrain", "--resume", str(tmp_path), "--output", str(tmp_path / "elsewhere")]) == 1
    assert "--resume DIR continues the run in DIR, where it writes; leave out --output" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    assert main(["pretrain", "--recipe", "demo", "--data", str(tmp_path), "--output", str(tmp_path / "afile")]) == 1
    assert f"moco: error: --output {tmp_path / 'afile'} is a file; give a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine" and ray.is_initialized() == was_running


def test_column_options_are_names_even_when_they_read_as_numbers():
    import argparse

    from pipelines.pretrain.command import _scaling_overrides

    args = argparse.Namespace(
        workers=2, cpus_per_worker=None, gpus_per_worker=None, max_failures=None,
        image_column="0", label_column="true", key_column=None,
    )  # fmt: skip
    config = load_config("demo", _scaling_overrides(args))
    assert (config.scaling.workers, config.data.image_column, config.data.label_column) == (2, "0", "true")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ray_cluster, tiny_shards, tmp_path):
    train, _ = tiny_shards
    run_dir = str(tmp_path / "run")
    # lr 0.05 for two steps (checkpointed at step 2), then x1e30: the loss becomes inf/NaN.
    config = _config(
        tmp_path,
        "optim.schedule=step",
        "optim.lr=0.05",
        "optim.milestones=[0.5]",
        "optim.gamma=1.0e30",
        "tracking.enabled=false",
        "training.epochs=4",
    )
    # The loss is checked at log and checkpoint steps (every 2): step 4 is the first after the jump.
    with pytest.raises(RunFailed, match=r"loss became non-finite by step 4; the last good checkpoint is .*step0+2"):
        run_pretraining(config, [train], run_dir)
    pointer = read_pointer(run_dir)
    assert pointer["step"] == 2
    saved = torch.load(Path(pointer["path"]) / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(value).all() for value in saved.values() if value.is_floating_point())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


#: Three epochs checkpointed at their ends only (steps 4, 8, 12), so a fallback lands on an epoch
#: end: the checks below are on which checkpoint is restored, not on a mid-epoch stream restart.
EPOCH_END_CHECKPOINTS = ("training.epochs=3", "checkpoint.every_steps=0", "debug.record_batches=true")


def test_resume_continues_a_stopped_run_past_a_damaged_checkpoint_and_a_garbage_pointer(
    ray_cluster, tiny_shards, tmp_path, capfd, monkeypatch
):
    """Also: the run is resumed from another directory, with the paths it was started with relative
    and its MLflow store found from run.json (``tracking.uri`` null on resume)."""
    import mlflow

    train, val = tiny_shards
    run_dir = tmp_path / "run"
    config = _config(tmp_path, *EPOCH_END_CHECKPOINTS, "debug.fail_at_step=9")
    monkeypatch.chdir(Path(train).parent)
    with pytest.raises(RunFailed, match=r"injected failure at step 9.*resume from step 8 with --resume"):
        run_pretraining(config, [Path(train).name], str(run_dir))
    assert read_pointer(str(run_dir))["step"] == 8
    client = mlflow.MlflowClient(tracking_uri=config.tracking.uri)
    run_id = read_pointer(str(run_dir))["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    with pytest.raises(ConfigError, match="already holds a run"):
        run_pretraining(config, [train], str(run_dir))
    # Refused before anything runs: a run shorter than it has trained, and a resume on other data.
    shorter, _ = load_run_for_resume(str(run_dir), ["training.epochs=1"])
    with pytest.raises(ConfigError, match="has trained 8 steps and the config now plans 4: a run cannot be made"):
        run_pretraining(shorter, [train], str(run_dir), resume=True)
    with pytest.raises(ConfigError, match=rf"was started on {train} \(32 images\); --data {val} holds 12"):
        run_pretraining(shorter, [val], str(run_dir), resume=True)
    damaged = run_dir / "train" / "checkpoint_step000000008" / "model.pt"  # the newest
    _truncate(damaged)
    (run_dir / POINTER_NAME).write_text("")
    capfd.readouterr()
    monkeypatch.chdir(tmp_path)
    resumed_config, inputs = load_run_for_resume(str(run_dir), ["debug.fail_at_step=0", "tracking.uri=null"])
    assert inputs["data"] == [train] and inputs["tracking_uri"] == config.tracking.uri
    summary = run_pretraining(resumed_config, inputs["data"], str(run_dir), resume=True)
    assert not (tmp_path / "mlruns").exists()
    err = capfd.readouterr().err
    assert f"warning: {run_dir / POINTER_NAME} is not valid JSON" in err
    assert f"warning: {damaged} has " in err and "resuming from step 4" in err
    assert err.count(str(damaged)) == 1 and "resuming at step 4 (epoch 1)" in err  # the workers warn no more
    assert summary["steps"] == 12 and read_pointer(str(run_dir))["step"] == 12
    assert int(_checkpoint_model(summary)["queue.pointer"]) == (12 * 8) % 40
    # The same MLflow run (its id is in the checkpoint, not only in the pointer), finished now.
    assert summary["mlflow_run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == [2, 4, 6, 8, 6, 8, 10, 12]  # appended on resume
    trained = _trained_images(run_dir)  # steps 5 to 8 trained again, on the same images
    assert sorted(trained) == [(epoch, index) for epoch in (0, 1, 2) for index in range(32)]
    # Step 8 trained again went to a directory of its own beside the damaged one.
    assert "checkpoint_step000000008-1" in (run_dir / "train" / "checkpoint_manager_snapshot.json").read_text()

    for path in run_dir.glob("train/checkpoint_step*/model.pt"):
        _truncate(path)
    with pytest.raises(ConfigError, match=r"cannot resume .*: no intact checkpoint: .*step000000012/model.pt has"):
        run_pretraining(resumed_config, inputs["data"], str(run_dir), resume=True)


def test_a_failed_worker_restarts_from_the_newest_intact_checkpoint_with_the_tracking_server_down(
    ray_cluster, tiny_shards, tmp_path, capfd
):
    """Ray Train restarts the worker group (scaling.max_failures) and the run goes on from the newest
    checkpoint that is intact: the newest one (step 8) is damaged, so from step 4. The MLflow server
    is down throughout (nothing listens on port 9): training goes on, recorded in metrics.jsonl."""
    train, _ = tiny_shards
    config = load_config(
        "demo",
        TINY
        + [
            *EPOCH_END_CHECKPOINTS,
            "debug.fail_at_step=9",
            "debug.damage_checkpoint_at_step=8",
            "scaling.max_failures=1",
            "tracking.uri=http://127.0.0.1:9",
        ],
    )
    summary = run_pretraining(config, [train], str(tmp_path / "run"))
    err = capfd.readouterr().err
    damaged = tmp_path / "run" / "train" / "checkpoint_step000000008" / "model.pt"
    assert f"warning: {damaged} has " in err and "restoring an older checkpoint" in err
    assert "resuming at step 4 (epoch 1)" in err
    assert "warning: MLflow" in err and summary["mlflow_run_id"] is None
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == [2, 4, 6, 8, 6, 8, 10, 12]
    assert summary["steps"] == summary["total_steps"] == 12
    assert summary["images_seen"] == 12 * 8  # counted from the restored checkpoint on, not twice
    assert summary["queue_identical_across_workers"] is True
    assert int(_checkpoint_model(summary)["queue.pointer"]) == (12 * 8) % 40
    # The stream restarted right after what the checkpoint had trained on: each image once per epoch.
    trained = _trained_images(tmp_path / "run")
    assert sorted(trained) == [(epoch, index) for epoch in (0, 1, 2) for index in range(32)]


def test_a_refused_run_creates_nothing(ray_cluster, tiny_shards, tmp_path):
    train, _ = tiny_shards
    # The test cluster has 2 CPUs: a trainer reserving both would starve the readers.
    config = _config(tmp_path, "scaling.workers=1", "scaling.cpus_per_worker=2")
    with pytest.raises(ConfigError, match="reserve 2 of the cluster's 2 CPUs"):
        run_pretraining(config, [train], str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
