"""moco submit: a tiny pretraining through the Ray Jobs API against a head the test starts (loopback
only), followed to the end with its logs and final status; --stop stops a running job."""

import json
import time
from pathlib import Path

import pytest

from pipelines.cli import build_parser, main
from pipelines.cli_common import UserError
from pipelines.ingest.shards import build_shards
from pipelines.submit import EXCLUDES, _command, path_options, project_runtime_env
from tests.pipelines.fixtures import TINY_PRETRAIN, write_image_folder
from tests.pipelines.ray_processes import ray_head

ROOT = Path(__file__).resolve().parents[2]
# One worker, one epoch of 32 images in batches of 8: 4 steps.
JOB_SETTINGS = [*TINY_PRETRAIN, "scaling.workers=1", "training.epochs=1"]


@pytest.mark.parametrize(
    "command,message",
    [
        ([], "give the command to run after --"),
        (["--", "python", "train.py"], "must be a moco command"),
        (["--", "moco", "pretrain", "--output", "runs/x"], "--output runs/x is a relative path"),
        (["--", "moco", "pretrain", "--output=runs/x"], "--output runs/x is a relative path"),
        (["--", "moco", "pretrain", "--data", "/data/a", "shards/b", "--json"], "--data shards/b is a relative path"),
        (["moco", "probe", "--backbone", "run", "--train", "/t", "--val", "/v"], "--backbone run is a relative path"),
        (["moco", "probe", "--backbone", "/r", "--train", "/t", "shards/train"], "--train shards/train is a relative"),
        (["moco", "knn", "--backbone", "/r", "--train", "/t", "--val", "shards/val"], "--val shards/val is a relative"),
        (["moco", "tune", "momentum", "--data", "/d", "--probe-train", "p/t"], "--probe-train p/t is a relative"),
        (["moco", "tune", "mechanism", "--data", "/d", "--probe-val=p/v"], "--probe-val p/v is a relative path"),
        (["moco", "tune", "probe", "--backbone", "/r", "--resume", "sweep"], "--resume sweep is a relative path"),
        (["moco", "export", "--backbone", "/r", "-o", "r.pth"], "-o r.pth is a relative path"),
        (["moco", "shard", "/images", "--output", "shards"], "--output shards is a relative path"),
        (["moco", "demo", "--work-dir", "demo"], "--work-dir demo is a relative path"),
        (["moco", "pretrain", "--data", "/d", "--val", "v"], "--val-data v is a relative path"),  # an abbreviation
    ],
)
def test_commands_that_would_go_wrong_on_a_cluster_are_refused(command, message):
    with pytest.raises(UserError, match=message):
        _command(command)


def test_every_path_option_of_every_command_is_checked():
    expected = {"--backbone", "--train", "--val", "--data", "--val-data", "--probe-train", "--probe-val"}
    expected |= {"--output", "-o", "--resume", "--work-dir"}
    assert expected <= set(path_options(build_parser()))
    assert not {"--recipe", "--set", "--k", "--workers", "--format"} & set(path_options(build_parser()))


@pytest.mark.parametrize(
    "command",
    [
        ["moco", "pretrain", "--data", "s3://b/train", "/data/x", "--output", "/shared/runs/a"],
        ["moco", "probe", "--backbone", "gs://b/run", "--train", "/t", "--val", "~/v", "--output=/o", "--mode=cached"],
        [
            "moco",
            "tune",
            "momentum",
            "--data",
            "/d",
            "--probe-train",
            "s3://b/t",
            "--probe-val",
            "/v",
            "--values",
            "0.9",
        ],
        ["moco", "shard", "-o", "/shared/shards", "images"],  # --output takes one value: the rest are sources
    ],
)
def test_absolute_paths_and_uris_pass(command):
    assert _command(["--", *command]) == command


def test_the_project_travels_with_the_job():
    runtime_env = project_runtime_env("s3://b/runs", {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert runtime_env["working_dir"] == str(ROOT) and set(EXCLUDES) <= set(runtime_env["excludes"])
    assert {".venv", "outputs", "mlruns"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MOCO_STORAGE": "s3://b/runs"}


def test_an_unreachable_job_server_is_one_line(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--status", "raysubmit_x"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in error[0]


@pytest.fixture(scope="module")
def head():
    with ray_head(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit_data")
    write_image_folder(root / "train", {"a": 16, "b": 16}, start_seed=0)
    build_shards([root / "train"], root / "shards", row_group_size=8, workers=1, show_progress=False)
    return str(root / "shards")


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_submit_runs_a_pretraining_to_completion_and_follows_its_logs(head, train_shards, tmp_path, capsys):
    import mlflow

    storage, store = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    command = ["moco", "pretrain", "--recipe", "demo", "--data", train_shards]
    command += [f"--set={setting}" for setting in JOB_SETTINGS]
    argv = ["submit", "--address", head, "--storage", str(storage), "--env", f"MLFLOW_TRACKING_URI={store}"]
    assert main([*argv, "--json", "--", *command]) == 0
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    assert result["status"] == "SUCCEEDED" and result["job_id"] and result["address"] == head
    assert f"submitted job {result['job_id']}" in captured.err
    assert "step 4/4" in captured.err  # the job's own progress, followed while it ran

    (run,) = storage.iterdir()  # --storage: the run's default directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["output"] == str(run)
    run_info = mlflow.MlflowClient(tracking_uri=store).get_run(summary["mlflow_run_id"]).info  # --env reached it
    assert run_info.status == "FINISHED"

    assert main(["submit", "--address", head, "--status", result["job_id"], "--json"]) == 0
    status = _last_json(capsys.readouterr().out)
    assert status["status"] == "SUCCEEDED" and status["entrypoint"].startswith("moco pretrain --recipe demo")
    assert main(["submit", "--address", head, "--logs", result["job_id"], "--json"]) == 0
    assert "pretraining: 32 images, 4 steps" in _last_json(capsys.readouterr().out)["logs"]


def test_submit_stop_stops_a_running_job(head, train_shards, tmp_path, capsys):
    command = ["moco", "pretrain", "--recipe", "demo", "--data", train_shards, "--output", str(tmp_path / "run")]
    command += [f"--set={setting}" for setting in [*JOB_SETTINGS, "training.epochs=100000"]]
    assert main(["submit", "--address", head, "--no-wait", "--json", "--", *command]) == 0
    job_id = _last_json(capsys.readouterr().out)["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert main(["submit", "--address", head, "--status", job_id, "--json"]) == 0
        if _last_json(capsys.readouterr().out)["status"] == "RUNNING":
            break
        time.sleep(0.5)
    assert main(["submit", "--address", head, "--stop", job_id, "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["status"] == "STOPPED"
    assert main(["submit", "--address", head, "--status", job_id, "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["status"] == "STOPPED"
