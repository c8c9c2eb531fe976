"""Ray set-up shared by every job: joining or starting a cluster, and keeping Ray Data quiet."""

from __future__ import annotations

import logging
import warnings


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data: our commands report progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Raised by Ray Train's own default ingest options; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*deprecated")


def ensure_ray() -> None:
    """Join the running cluster (``RAY_ADDRESS``, ``ray job submit``), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=True, logging_level="WARNING")
    quiet_ray_data()
