"""How a job joins or starts Ray (pipelines.ray_runtime.ensure_ray): its ``ray.init`` options with
``ray.init`` stubbed, and what a real Ray Data execution on the driver prints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from pipelines import console
from pipelines.ray_runtime import ensure_ray

ROOT = Path(__file__).resolve().parents[2]


class _StartedCluster:
    address_info = {"session_dir": "/tmp/ray/session_stub"}


@pytest.fixture
def init_calls(monkeypatch):
    """The keyword arguments of every ``ray.init`` call ensure_ray makes (none reaches Ray)."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options) or _StartedCluster())
    monkeypatch.setattr("pipelines.ray_runtime.quiet_ray_data", lambda: None)
    monkeypatch.setattr("pipelines.ray_runtime._keep_raylet_messages_in_logs", lambda: None)
    yield calls
    console.set_debug(False)


@pytest.mark.parametrize("debug", [False, True])
def test_a_local_cluster_runs_ray_dashboard_only_with_debug(init_calls, monkeypatch, debug):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    console.set_debug(debug)
    assert ensure_ray() is True
    (options,) = init_calls
    assert options["address"] == "local"
    assert options["include_dashboard"] is debug and options["log_to_driver"] is debug


def test_joining_a_cluster_leaves_its_dashboard_as_it_is(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ensure_ray() is False
    (options,) = init_calls
    assert options["address"] == "ray://head:10001" and "include_dashboard" not in options


def test_ray_data_on_the_driver_prints_no_notice_of_its_own():
    """A command that runs a Ray Data execution in its own process (``moco probe --cached``, the
    demo's probe) shows our progress only: no "Progress bars disabled" notice from Ray Data."""
    script = (
        "import ray\n"
        "from pipelines.ray_runtime import ensure_ray\n"
        "ensure_ray()\n"
        "assert len(ray.data.range(8).map_batches(lambda batch: batch).take_all()) == 8\n"
        "ray.shutdown()\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Progress bars" not in result.stdout + result.stderr
