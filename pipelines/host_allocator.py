"""Host memory for a training process: glibc malloc keeps freed memory for the next step.

By default glibc returns a freed block above its mmap threshold (128 KiB at start, raised
adaptively) or at the top of the heap to the kernel, so every step's new batch and activations
fault their pages in again: ~8,100 page faults a step for a resnet18 at 64 px on a CPU
(docs/BENCHMARKS.md). Keeping blocks below 32 MiB in the heap and not trimming it reuses the same
pages every step, as PyTorch's own caching allocator does for GPU memory. The process then holds
its peak working set instead of giving it back between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: blocks below this are carved from the heap, not mmap-ed: glibc's largest allowed threshold on 64-bit
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory at the top of the heap kept before trimming it back to the kernel
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: extra memory asked of the kernel whenever the heap grows
TOP_PAD = 64 * 1024 * 1024


def apply_host_allocator(setting: str) -> bool:
    """``training.host_allocator`` in this process: ``reuse`` keeps freed memory, ``system``
    leaves malloc alone. Returns whether freed memory is now kept."""
    return setting == "reuse" and keep_freed_host_memory()


def keep_freed_host_memory() -> bool:
    """Tell glibc malloc, in this process, to keep freed memory for reuse; False where the C
    library is not glibc (macOS, musl) and nothing was changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
