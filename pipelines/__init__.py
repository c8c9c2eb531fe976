"""Ray compositions around ``moco_core``: the ``moco`` command line, ingest and pretraining jobs."""

import os

# Arrow's allocator (mimalloc) hands freed pages back to the OS after a second, so each batch Ray
# Data assembles from reader blocks (tens of MB at 224 px) faults its pages in again; keeping them
# makes assembling a batch 2-4x cheaper (docs/BENCHMARKS.md). It must be set before pyarrow loads;
# the workers of a local Ray cluster started from this process inherit it. setdefault: a value
# the user exported wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "-1")
