"""Ray clusters and servers that a test starts as processes of its own, on loopback only, and
stops by the process it started (never `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    for _ in range(count):
        handle = socket.socket()
        handle.bind(("127.0.0.1", 0))
        sockets.append(handle)
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``url`` answers; fails with the log's tail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401: Ray's token authentication is on)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only the process this test started (a
    ``ray start --block`` takes the processes it started with it either way: they die with it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """``ray start --head --block`` with its own temp dir and ports on 127.0.0.1 and the dashboard
    (the job server) on; yields the dashboard's URL. Terminating the blocking ``ray start``
    stops exactly the processes it started."""
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
    names += ("runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")
    names += ("ray-client-server-port",)
    ports = dict(zip(names, free_ports(len(names))))
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_DEDUP_LOGS": "0"}
    environment.pop("RAY_ADDRESS", None)
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1"]
    command += [f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={100 * 1024 * 1024}"]
    command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    command += [f"--{name}={port}" for name, port in ports.items()]
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{address}/api/version", process, log)
        yield address
    finally:
        stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
