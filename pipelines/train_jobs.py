"""What every Ray Train job (pretraining, the full linear probe) sets up the same way: the check
that the trainer fits the cluster, the reader lanes beside it, the TorchTrainer, and the one-line
cause of a failure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipelines.config import ConfigError
from pipelines.ingest import placement
from pipelines.ingest.placement import ReaderLanes
from pipelines.pretrain.checkpoints import TRAIN_DIR
from pipelines.pretrain.config import ScalingSection


def check_cluster(scaling: ScalingSection, reader_resources: Mapping[str, float], fixed: bool) -> None:
    """The trainer must leave CPUs to the data readers, and on a cluster that cannot grow (``fixed``:
    the local one this process started) find the GPUs it asks for (checked before anything is
    created: Ray Train would otherwise wait for them). Readers on nodes of their own
    (``data.reader_resources``) are checked by :func:`reader_lanes`."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    trainer_gpus = scaling.workers * scaling.gpus_per_worker
    if fixed and trainer_gpus > cluster_gpus:
        raise ConfigError(
            f"the trainer asks for {trainer_gpus:g} GPUs and this machine has {cluster_gpus:g}; "
            "lower --gpus-per-worker or --workers, or join a cluster that has them (RAY_ADDRESS)"
        )
    if reader_resources:
        return
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    trainer_cpus = scaling.workers * scaling.cpus_per_worker
    if trainer_cpus >= cluster_cpus:
        raise ConfigError(
            f"the trainer would reserve {trainer_cpus:g} of the cluster's {cluster_cpus:g} CPUs and starve the "
            "data readers; lower --cpus-per-worker or --workers"
        )


def reader_lanes(scaling: ScalingSection, readers: int, reader_resources: Mapping[str, float]) -> ReaderLanes:
    """Lanes per worker, CPUs per lane and where lanes run, on the cluster Ray is connected to
    (:func:`pipelines.ingest.placement.reader_lanes`)."""
    import ray

    return placement.reader_lanes(
        readers=readers,
        workers=scaling.workers,
        trainer_cpus=scaling.workers * scaling.cpus_per_worker,
        trainer_uses_gpus=scaling.gpus_per_worker > 0,
        cluster_cpus=ray.cluster_resources().get("CPU", 1),
        reader_resources=reader_resources,
        nodes=ray.nodes() if reader_resources else (),
    )


def build_torch_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    scaling: ScalingSection,
    output: str,
    keep_checkpoints: int,
    datasets: dict[str, Any],
) -> Any:
    """A TorchTrainer writing its checkpoints to ``output/train``. Training streams are built by
    each worker for its own lanes (pipelines.ingest.stream); ``datasets`` (evaluation data) go
    through Ray Train unsplit."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {}),
            },
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN_DIR,
            storage_path=output,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def root_cause(error: BaseException) -> str:
    """The innermost error's message (Ray wraps worker errors several levels deep)."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
