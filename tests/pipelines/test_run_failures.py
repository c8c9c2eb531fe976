"""What a user sees when a ``moco pretrain`` process is stopped or refused: run as a user runs it,
in a process of its own that starts its own Ray (pipelines.ray_runtime.ensure_ray)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.ingest.shards import build_shards
from pipelines.pretrain.checkpoints import list_checkpoints, newest_intact_checkpoint, read_pointer
from pipelines.pretrain.driver import load_run_for_resume
from tests.pipelines.fixtures import TINY_PRETRAIN as TINY
from tests.pipelines.fixtures import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
#: Lines Ray writes itself: forwarded worker output ``(RayTrainWorker pid=1)``, its loggers'
#: ``2026-01-01 10:00:00,000\tWARNING`` and C++ ``[2026-01-01 10:00:00,000 E 1 2]`` prefixes.
RAY_LINE = re.compile(r"\(\w+ pid=\d+\)|^\[?\d{4}-\d\d-\d\d|WARNING|core_worker|TrainingReport|Progress bars")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("failures_data")
    write_image_folder(root / "images", {"a": 16, "b": 16})
    build_shards([root / "images"], root / "shards", row_group_size=8, workers=1, show_progress=False)
    return str(root / "shards")


def _pretrain(shards: str, tmp_path: Path, *extra: str) -> list[str]:
    # One worker: these tests are about stopping the process (test_pretrain.py covers two workers).
    overrides = [item for key in [*TINY, "scaling.workers=1"] for item in ("--set", key)]
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "pretrain",
        "--recipe",
        "demo",
        "--data",
        shards,
        "--output",
        str(tmp_path / "run"),
        *overrides,
        "--set",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        *extra,
    ]


def _start(argv: list[str], stderr: Path) -> subprocess.Popen:
    """A process in a session of its own, as a terminal runs a command: Ctrl-C reaches its group.
    SIGINT is handled as in a terminal even when these tests run in a background job, which
    ignores it (and Python then installs no KeyboardInterrupt handler)."""

    def terminal_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(stderr, "w") as err:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            preexec_fn=terminal_sigint,
        )


def _processes_in_session(session: int) -> list[str]:
    """``pid comm`` of every live process of the session (Ray's processes stay in their driver's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(text.split(")", 1)[0] + ")")
    return found


def _wait_until(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def _no_processes_left(session: int, within: float = 20.0) -> list[str]:
    deadline = time.monotonic() + within
    while _processes_in_session(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _processes_in_session(session)


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_run_marks_it_killed_and_says_how_to_continue(shards, tmp_path, stop):
    import mlflow

    run = tmp_path / "run"
    process = _start(_pretrain(shards, tmp_path, "--set", "training.epochs=100"), tmp_path / "stderr.txt")
    try:
        _wait_until(lambda: (run / "latest_checkpoint.json").exists(), process, 300, "first checkpoint")
        if stop == "ctrl_c":
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            os.kill(process.pid, signal.SIGTERM)  # what kill, a scheduler or Kubernetes sends the command
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    newest = read_pointer(str(run))
    message = re.fullmatch(
        rf"moco: interrupted at step (\d+); the newest checkpoint is step (\d+); "
        rf"continue with moco pretrain --resume {re.escape(str(run))}",
        lines[-1],
    )
    assert message, lines[-1]
    assert int(message[2]) == newest["step"] <= int(message[1]) < 100 * 4
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(newest["mlflow_run_id"]).info.status == "KILLED"
    assert _no_processes_left(process.pid) == []
    # The directory is resumable from that checkpoint.
    config, inputs = load_run_for_resume(str(run), [])
    assert inputs["data"] == [shards] and config.training.epochs == 100
    assert newest_intact_checkpoint(list_checkpoints(str(run))).state.step == newest["step"]
    # Our lines only: Ray's own stay in its log files, which the run named once.
    assert [line for line in lines if RAY_LINE.search(line)] == []
    assert sum(line.startswith("Ray's own log lines: ") for line in lines) == 1


def test_a_second_ctrl_c_stops_at_once(shards, tmp_path):
    process = _start(_pretrain(shards, tmp_path, "--set", "training.epochs=100"), tmp_path / "stderr.txt")
    try:
        _wait_until(lambda: "pretraining:" in (tmp_path / "stderr.txt").read_text(), process, 300, "training")
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.1)  # the first is being handled: stopping Ray takes seconds
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=10) == 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1] == "moco: interrupted twice; stopped at once"
    assert _no_processes_left(process.pid) == []


def test_a_run_this_machine_cannot_take_is_refused_before_anything_is_created(shards, tmp_path):
    argv = _pretrain(shards, tmp_path, "--gpus-per-worker", "64")
    finished = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert lines[-1].startswith("moco: error: the trainer asks for 64 GPUs and this machine has ")
    assert [line for line in lines if RAY_LINE.search(line)] == []
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "mlflow.db").exists()
