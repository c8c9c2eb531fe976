import platform
import subprocess
import sys

import pytest

#: a fresh process allocates and frees blocks of a step's sizes 20 times and prints its page faults
STEPS = """
import resource, sys
import numpy as np
if sys.argv[1] == "reuse":
    from pipelines.host_allocator import keep_freed_host_memory
    assert keep_freed_host_memory()
def step():
    blocks = [np.ones(size, dtype=np.uint8) for size in (3 << 20, 9 << 20, 1 << 20, 17 << 20, 5 << 20)]
    return sum(int(block[-1]) for block in blocks)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(allocator: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, allocator], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reused_host_memory_stops_the_page_faults_of_each_step():
    system = page_faults("system")
    assert system > 20 * (1 << 20) // 4096  # at least one block's pages faulted in again every step
    assert page_faults("reuse") < system / 100
