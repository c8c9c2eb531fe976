"""Shared measurement helpers: machine description and throughput timing."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from pipelines.console import Progress


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measure_in_fresh_process(function: str, label: str, **kwargs: object) -> dict:
    """``function(**kwargs)`` (``"module:name"``, returning a JSON-able dict) run in a new Python
    process, as a user runs a script or a ``moco`` command: nothing an earlier measurement left
    behind (threads, torch settings, a stopped Ray session, allocator state) helps or slows it.
    Its progress lines (stderr) show as it runs."""
    module, name = function.split(":")
    code = f"import json, sys; from {module} import {name}; print(json.dumps({name}(**json.loads(sys.argv[1]))))"
    finished = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], stdout=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{label}: the measurement failed (exit {finished.returncode}); its output is above")
    return json.loads(finished.stdout.strip().splitlines()[-1])


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray cluster of ``num_cpus`` CPUs for one measurement, quiet, stopped afterwards."""
    import ray

    from pipelines.ray_runtime import quiet_ray_data

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def median_of(runs: list[dict], key: str):
    """The median of a float field over measurement rounds (rounded to 3 places); any other field
    is taken from the first round."""
    if not isinstance(runs[0][key], float):
        return runs[0][key]
    return round(statistics.median(run[key] for run in runs), 3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_throughput(
    steps_by_name: dict[str, Callable[[], object]],
    items_per_step: int,
    warmup: int,
    steps: int,
    rounds: int,
    device: torch.device,
    label: str,
) -> dict[str, float]:
    """Median items/s of each named step function, timed in interleaved rounds.

    Each round times ``steps`` calls of every function in turn, so drifts of a shared machine
    (clock boost, neighbours) hit all of them alike; the median over rounds is reported.
    """
    progress = Progress(label, total=len(steps_by_name) * (warmup + rounds * steps), unit="step")
    done = 0
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
            done += 1
            progress.update(done)
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
                done += 1
                progress.update(done, extra=name)
            synchronize(device)
            samples[name].append(items_per_step * steps / (time.perf_counter() - start))
    progress.finish(done)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def median_milliseconds(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``call`` in milliseconds."""
    call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return sorted(times)[len(times) // 2]
