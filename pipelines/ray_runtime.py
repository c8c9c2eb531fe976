"""Ray set-up shared by every job: joining or starting a cluster, keeping Ray's own output in its
log files, and stopping what a job started.

What the user sees on the terminal is our progress and our messages. Ray's own lines (its
workers' and actors' stdout and stderr, its deprecation and start-up warnings, Ray Data's
execution lines) stay in Ray's log files, named once when the cluster starts; ``--debug`` shows
them on the terminal as well. Our workers' progress reaches the terminal through
:mod:`pipelines.run_console`, not through Ray's log forwarding.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

from pipelines.console import debug_enabled, note


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data: our commands report progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ...": Ray Data's notice of the setting above, at
    # WARNING, once per process that runs an execution (the driver of a cached probe, the demo).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Raised by Ray Train's own default ingest options; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*deprecated")


def release_finished_datasets() -> None:
    """Free the object-store copies a finished Ray Data execution was given (a backbone, a read plan).

    The driver's finished operators hold those references in reference cycles, so the copies stay
    pinned until Python's next full collection; a process that runs one job after another (a Tune
    trial, a notebook, the test suite) would fill the object store and spill to disk meanwhile.
    """
    gc.collect()


def on_this_node() -> dict[str, Any]:
    """Actor options that place an actor on the calling process's node (a job's driver): a job's
    shared state (its ingest counts, its console) then lives as long as the driver does, whichever
    worker or reader nodes are lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def ensure_ray() -> bool:
    """Join the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it), else start a local one
    of this process's own (never a cluster some other ``ray start`` left on this machine).

    Returns:
        True when this call started a local cluster: its resources are all there will be.
    """
    import ray

    if ray.is_initialized():
        quiet_ray_data()
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    debug = debug_enabled()
    options: dict[str, Any] = {}
    if address == "local":
        # Ray's dashboard costs a local run 0.04 of a core while idle (docs/BENCHMARKS.md), which a
        # 2-core machine's training misses; --debug starts it for looking inside a run.
        options["include_dashboard"] = debug
    # log_to_driver: whether Ray copies every worker's and actor's output to this terminal.
    context = ray.init(
        address=address,
        log_to_driver=debug,
        configure_logging=True,
        logging_level="INFO" if debug else "ERROR",
        **options,
    )
    _stop_on_sigterm_as_on_ctrl_c()
    if not debug:
        _keep_raylet_messages_in_logs()
        where = context.address_info.get("session_dir")
        if where:
            note(f"Ray's own log lines: {where}/logs (shown here with --debug)")
    quiet_ray_data()
    return address == "local"


def _stop_on_sigterm_as_on_ctrl_c() -> None:
    """SIGTERM (``kill``, a scheduler ending the job, Kubernetes deleting its pod) raises
    KeyboardInterrupt, as Ctrl-C does: a run then says where it stopped and how to continue, and
    marks its MLflow run KILLED. Ray's own handler, which ``ray.init`` installs, exits at once
    (the MLflow run stays RUNNING) and its C++ part prints a stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_once)


def _interrupt_once(signum: int, frame: Any) -> None:
    """The first SIGTERM raises KeyboardInterrupt; later ones are ignored while the command stops:
    senders repeat it (GNU ``timeout`` signals the command, then its process group), and a
    scheduler that will not wait follows with SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _keep_raylet_messages_in_logs() -> None:
    """Drop the messages raylets push to the driver (e.g. "(raylet) WARNING: 8 PYTHON worker
    processes have been started ..."), which Ray prints to stdout whatever ``log_to_driver``
    says and without a switch (ray-project/ray#9384, #63800); each raylet's ``raylet.out`` log
    keeps them. A Ray without the printing function this replaces prints them as before."""
    from ray._private import worker as ray_worker

    print_to_stdstream = getattr(ray_worker, "print_to_stdstream", None)
    if print_to_stdstream is None or getattr(print_to_stdstream, "keeps_raylet_messages_in_logs", False):
        return

    def print_all_but_raylet_messages(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            print_to_stdstream(data, ignore_prefix)

    print_all_but_raylet_messages.keeps_raylet_messages_in_logs = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_all_but_raylet_messages


def stop_ray() -> None:
    """Disconnect from Ray, stopping the local cluster if this process started one.

    The actors a job created (Ray Train's controller and its workers, the reader lanes) belong to
    this driver, so they stop with it on a joined cluster as well.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()


def kill_local_ray_now() -> None:
    """SIGKILL every process this one started, directly or not: the Ray head a local cluster runs
    here (GCS, raylet, dashboard) and the workers and agents its raylet started, which would take a
    minute to notice their raylet is gone. Linux only (/proc); elsewhere they end by themselves."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending, descendants = [os.getpid()], []
    while pending:
        children = parents.get(pending.pop(), [])
        descendants.extend(children)
        pending.extend(children)
    for pid in descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
