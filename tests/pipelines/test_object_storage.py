"""Run directories in object storage, for real: a local S3-compatible server (moto, on loopback)
holds the shards and the run directory; pretraining fails, resumes and finishes in the bucket, and
the cached linear probe of its backbone keeps its features and results there too."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from pipelines.cli import main
from pipelines.ingest.shards import build_shards
from pipelines.pretrain.checkpoints import read_pointer
from tests.pipelines.fixtures import TINY_PRETRAIN, write_image_folder
from tests.pipelines.ray_processes import free_ports, stop, wait_for_http

BUCKET = "moco-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """``moto`` in server mode on 127.0.0.1 (an S3 API on a free port), stopped after the module."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=output
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint, server, log, timeout=60)
        yield endpoint
    finally:
        stop(server)


@pytest.fixture
def s3_settings(s3_endpoint, monkeypatch):
    """Credentials and endpoint the way a cluster gives them, in the environment (pyarrow reads
    AWS_ENDPOINT_URL), set before Ray starts so that every Ray process inherits them."""
    settings = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    return settings


def _bucket_with_shards(tmp_path: Path, endpoint: str) -> pafs.S3FileSystem:
    """The test's own client of the server (the product finds it through AWS_ENDPOINT_URL)."""
    filesystem = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    filesystem.create_dir(BUCKET)
    write_image_folder(tmp_path / "train", {"a": 16, "b": 16}, start_seed=0)
    build_shards([tmp_path / "train"], tmp_path / "shards", row_group_size=8, workers=1, show_progress=False)
    pafs.copy_files(str(tmp_path / "shards"), f"{BUCKET}/shards", destination_filesystem=filesystem)
    return filesystem


def test_pretrain_fail_resume_and_probe_with_data_and_run_directories_in_a_bucket(
    s3_settings, without_shared_ray, tmp_path, capsys
):
    import ray

    filesystem = _bucket_with_shards(tmp_path, s3_settings["AWS_ENDPOINT_URL"])
    ray.init(
        address="local", num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False
    )
    run = f"s3://{BUCKET}/runs/tiny"
    # One worker: this test is about where files go (test_pretrain.py covers two workers).
    settings = [*TINY_PRETRAIN, "scaling.workers=1", "debug.fail_at_step=5", "tracking.enabled=false"]
    argv = ["pretrain", "--recipe", "demo", "--data", f"s3://{BUCKET}/shards", "--output", run]
    assert main([*argv, *[f"--set={setting}" for setting in settings]]) == 1
    error = capsys.readouterr().err
    assert "injected failure at step 5" in error and f"resume from step 4 with --resume {run}" in error
    pointer = read_pointer(run)
    assert pointer["step"] == 4 and pointer["path"] == f"{run}/train/checkpoint_step000000004"

    assert main(["pretrain", "--resume", run, "--set", "debug.fail_at_step=0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == summary["total_steps"] == 8 and summary["started_at_step"] == 4
    assert summary["output"] == run and summary["checkpoint"] == f"{run}/train/checkpoint_step000000008"

    def read(path: str) -> bytes:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    assert json.loads(read(f"{BUCKET}/runs/tiny/summary.json"))["steps"] == 8
    assert summary["backbone"] == f"{run}/backbone.pt"
    backbone = torch.load(io.BytesIO(read(f"{BUCKET}/runs/tiny/backbone.pt")), weights_only=True)
    assert "conv1.weight" in backbone and not any(key.startswith("fc.") for key in backbone)
    final = read(f"{BUCKET}/runs/tiny/train/checkpoint_step000000008/model.pt")
    model = torch.load(io.BytesIO(final), weights_only=True)
    assert int(model["model"]["queue.pointer"]) == (8 * 8) % 40
    kept = filesystem.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/tiny/train"))
    checkpoints = sorted(info.base_name for info in kept if info.base_name.startswith("checkpoint_step"))
    assert checkpoints == ["checkpoint_step000000006", "checkpoint_step000000008"]  # checkpoint.keep=2

    # The linear probe of the run's backbone (read from the bucket), its features cached there.
    probe = f"s3://{BUCKET}/probes/tiny"
    probe_settings = ["view.size=16", "optim.batch_size=8", "optim.epochs=2", "optim.milestones=[1]"]
    probe_settings += ["training.precision=fp32", "cached.batch_size=16", "tracking.enabled=false"]
    argv = ["probe", "--backbone", run, "--train", f"s3://{BUCKET}/shards", "--val", f"s3://{BUCKET}/shards"]
    assert main([*argv, "--output", probe, "--json", *[f"--set={setting}" for setting in probe_settings]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "cached" and result["train_images"] == result["val_images"] == 32
    assert result["linear"] == f"{probe}/linear.pt" and result["features"].startswith(f"{probe}/features/")
    assert json.loads(read(f"{BUCKET}/probes/tiny/summary.json"))["top1"] == result["top1"]
    cached = result["features"].removeprefix("s3://")
    assert read(f"{cached}/meta.json") and read(f"{cached}/train_features.npy")


def test_default_outputs_go_under_moco_storage_when_it_is_set(monkeypatch):
    from pipelines.filesystems import STORAGE_ENV, default_output_dir

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert default_output_dir("knn").startswith("outputs/knn-")
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/moco-runs")
    assert default_output_dir("probe-cached").startswith("s3://bucket/moco-runs/probe-cached-")
