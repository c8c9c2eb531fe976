"""How a job joins or starts Ray (pipelines.ray_runtime.ensure_ray), with ``ray.init`` stubbed."""

import pytest
import ray

from pipelines import console
from pipelines.ray_runtime import ensure_ray


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
