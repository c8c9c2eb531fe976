"""Shared fixtures. Ray tests share one small local cluster per test session."""

from __future__ import annotations

import os

import pytest

#: Small enough that the bounded-memory test streams several times this much data through it.
OBJECT_STORE_BYTES = 120 * 1024 * 1024


def _start_shared_ray() -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs and a small object store, started once per session."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _start_shared_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def without_shared_ray():
    """For a test that starts Ray its own way (several nodes, another environment): the shared
    cluster is stopped for the test and started again after it if it was running."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_running:
        _start_shared_ray()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's status once every report is written, skipping the interpreter's
    teardown: after a full, passing suite it once died there with a segfault in native code
    (torch/pyarrow/Ray threads being finalised), which turned 510 passes into a failed CI run."""
    import sys

    if not _EXIT_STATUS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
