"""Run a function in a real multi-process gloo group on the CPU and collect each rank's result."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        dist.barrier()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], out_dir: Path, *args: Any, world_size: int = 2) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return the per-rank return values in rank order.

    ``fn`` must be a module-level function; return values must be ``torch.save``-able.
    """
    results = [Path(out_dir) / f"rank{rank}.pt" for rank in range(world_size)]
    try:
        mp.spawn(_worker, args=(world_size, _free_port(), str(out_dir), fn, args), nprocs=world_size, join=True)
    except mp.ProcessExitedException:
        # A signal during gloo's teardown, after every rank saved its result, is not the code under test.
        if not all(path.exists() for path in results):
            raise
    return [torch.load(path, weights_only=False) for path in results]
