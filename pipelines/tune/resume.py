"""``--resume DIR``: continue any interrupted sweep with the inputs it was started with."""

from __future__ import annotations

from typing import Any

from pipelines.tune.sweep import read_sweep


def resume_sweep(output: str, stop_after_trials: int = 0) -> dict[str, Any]:
    """Continue the sweep in ``output``: finished trials are kept, the others run.

    Raises:
        ConfigError: ``output`` holds no sweep.
    """
    record = read_sweep(output)
    inputs = record["inputs"]
    if record["kind"] == "probe":
        from pipelines.evaluate.probe_config import probe_config_from_mapping
        from pipelines.tune.probe_sweep import run_probe_sweep

        return run_probe_sweep(
            inputs["backbone"],
            inputs["train"],
            inputs["val"],
            output,
            probe_config_from_mapping(inputs["config"]),
            record["points"],
            inputs["scheduler"],
            inputs["max_concurrent"],
            inputs["cpus_per_trial"],
            inputs["gpus_per_trial"],
            resume=True,
            stop_after_trials=stop_after_trials,
        )
    from pipelines.tune.pretrain_sweep import resume_pretrain_sweep

    return resume_pretrain_sweep(record["kind"], output, inputs, stop_after_trials)
