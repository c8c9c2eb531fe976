"""The pretraining job's driver: plan data, build the Ray Data streams and the TorchTrainer, run,
and turn the outcome into data.

:func:`run_pretraining` is a plain function (a Tune trial can call it) that returns a dict with
everything a sweep needs; the ``moco pretrain`` command is a thin wrapper around it. Output
directory layout::

    OUTPUT/config.yaml              resolved configuration
    OUTPUT/run.json                 inputs (data paths, scaling) for --resume
    OUTPUT/train/checkpoint_step*/  Ray Train checkpoints (the newest K are kept)
    OUTPUT/latest_checkpoint.json   the newest complete checkpoint
    OUTPUT/metrics.jsonl            every logged metric (kept even when MLflow is down)
    OUTPUT/backbone.pt              final backbone weights (torchvision keys, no fc)
    OUTPUT/curves.png               loss and kNN curves
    OUTPUT/summary.json             the returned summary
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from moco_core.image_io import ImageLimits
from pipelines.cli_common import Interrupted, UserError
from pipelines.config import ConfigError, flatten
from pipelines.console import note
from pipelines.filesystems import absolute_uri, join, output_directory
from pipelines.ingest.planning import plan_collection
from pipelines.ingest.sources import check_decodable
from pipelines.ingest.stream import build_view_dataset, plan_layout
from pipelines.ingest.units import Collection, ColumnNames
from pipelines.ingest.views import EvalViewFunction, TwoViewFunction
from pipelines.pretrain.checkpoints import (
    TRAIN_DIR,
    DamagedCheckpoint,
    IntactCheckpoint,
    holds_run,
    list_checkpoints,
    newest_intact_checkpoint,
    newest_recorded_checkpoint,
    read_pointer,
)
from pipelines.pretrain.config import PretrainConfig, config_from_mapping, config_to_dict, plan_steps
from pipelines.pretrain.plan import PretrainPlan
from pipelines.pretrain.run_files import (
    logged_losses,
    read_json,
    read_text,
    remove_file,
    write_bytes,
    write_json,
    write_text,
)
from pipelines.pretrain.tracking import Tracker, default_tracking_uri, ui_command
from pipelines.ray_runtime import ensure_ray, kill_local_ray_now, on_this_node, stop_ray
from pipelines.run_console import ConsoleRelay, RunConsole, run_watched
from pipelines.train_jobs import build_torch_trainer, check_cluster, reader_lanes, root_cause

RUN_INPUTS = "run.json"
CONFIG_FILE = "config.yaml"
SUMMARY = "summary.json"
BACKBONE = "backbone.pt"


class RunFailed(UserError):
    """Training stopped without finishing (non-finite loss, or failures beyond max_failures)."""


def _columns(config: PretrainConfig) -> ColumnNames:
    return ColumnNames(config.data.image_column, config.data.label_column, config.data.key_column)


def _plan(paths: list[str], config: PretrainConfig, role: str) -> Collection:
    collection = plan_collection(paths, config.data.layout, _columns(config))
    check_decodable(collection)
    if collection.num_images is None:
        raise ConfigError(
            f"{role}: the size of a WebDataset collection is unknown before reading it; "
            "build shards with 'moco shard' first so steps and epochs can be planned"
        )
    return collection


def _knn_collections(train: Collection, val: Collection | None) -> tuple[Collection, Collection] | None:
    """(bank, queries) for the kNN monitor: the labelled training data against the validation
    data; with unlabelled training data, the validation data's units split in two."""
    if val is None:
        return None
    if not val.labelled:
        raise ConfigError("--val-data has no labels (class folders, a label column or .cls): kNN needs them")
    if train.labelled:
        return train, val
    if len(val.units) < 2:
        raise ConfigError(
            "--val-data is one read unit; with unlabelled training data it is split in two "
            "for kNN, so give it at least two row groups / files"
        )
    return val.select(slice(0, None, 2)), val.select(slice(1, None, 2))


def _eval_datasets(
    knn_sets: tuple[Collection, Collection], config: PretrainConfig, limits: ImageLimits, lanes: int
) -> dict[str, Any]:
    """The kNN bank and queries: read while training waits for them, so their lanes reserve no CPU
    (the training lanes hold theirs all along)."""
    eval_view = EvalViewFunction(
        config.eval.image_size or config.augment.size, limits, crop_fraction=config.eval.crop_fraction
    )
    datasets: dict[str, Any] = {}
    for name, collection in zip(("knn_bank", "knn_query"), knn_sets):
        layout = plan_layout(collection, lanes_per_worker=min(lanes, len(collection.units)), shuffle=False)
        datasets[name] = build_view_dataset(collection, eval_view, layout, end_epoch=1, lane_cpus=0).dataset
    datasets["knn_bank"] = datasets["knn_bank"].limit(config.eval.bank_size)
    return datasets


def run_pretraining(
    config: PretrainConfig,
    data: list[str],
    output: str,
    val_data: list[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain with Ray Train and return the summary (also written to ``OUTPUT/summary.json``).

    Everything that can be checked (config, data, cluster resources, the run directory, the
    checkpoint to resume from) is checked before anything is created; what is created before a
    failure is marked: the MLflow run FAILED (KILLED on Ctrl-C), and ``output`` holds no
    checkpoint unless training wrote one, so it can be given again.

    Args:
        config: validated job configuration (see :mod:`pipelines.pretrain.config`).
        data: training collection paths/URIs/globs.
        output: run directory (local path or URI); must not hold another run unless ``resume``.
        val_data: labelled collection for the kNN monitor, or None.
        resume: continue the run in ``output`` from its newest intact checkpoint (from step 0
            when it stopped before its first checkpoint).

    Raises:
        ConfigError: bad inputs, or nothing to resume (before anything is created).
        RunFailed: training stopped early; the message says why and where the last checkpoint is.
        Interrupted: Ctrl-C; the message says where the run stopped and how to continue it.
    """
    started = time.time()
    output = output_directory(output)
    data = [absolute_uri(path) for path in data]  # recorded for --resume from any directory
    val_data = [absolute_uri(path) for path in val_data] if val_data else None
    if not resume and holds_run(output):
        raise ConfigError(
            f"{output} already holds a run with checkpoints; continue it with --resume {output} "
            "or choose a new --output"
        )
    recorded = (read_json(output, RUN_INPUTS) or {}) if resume else {}
    restore = _resume_point(output) if resume else None
    if restore is not None and _finished_as_configured(restore, config):
        return _already_complete(output, restore, restore.state.total_steps)
    check_cluster(config.scaling, config.data.reader_resources, fixed=ensure_ray())
    train = _plan(data, config, "--data")
    _check_same_collection(output, recorded, data, train)
    val = _plan(val_data, config, "--val-data") if val_data else None
    knn_sets = _knn_collections(train, val)
    steps_per_epoch, total_steps = plan_steps(config, train.num_images or 0)
    if restore is not None and restore.state.step > total_steps:
        raise ConfigError(
            f"{output} has trained {restore.state.step} steps and the config now plans {total_steps}: a run "
            "cannot be made shorter than it has trained; give --resume a larger training.epochs "
            f"(or training.total_steps), or use its checkpoint {restore.path} as it is"
        )
    if restore is not None and restore.state.step == total_steps:
        return _already_complete(output, restore, total_steps)
    lanes = reader_lanes(config.scaling, config.data.readers, config.data.reader_resources)
    layout = plan_layout(
        train,
        workers=config.scaling.workers,
        lanes_per_worker=lanes.per_worker,
        pool=config.data.shuffle_pool,
        seed=config.training.seed,
        shuffle=config.data.shuffle,
    )
    config_dict = config_to_dict(config)

    # Everything checkable is checked: from here on, what is created is marked if the run stops.
    local_output = Path(output) if "://" not in output else None
    # The MLflow store the run was started in holds its run id, whatever the directory or
    # $MLFLOW_TRACKING_URI of a --resume.
    tracking_uri = (
        (config.tracking.uri or recorded.get("tracking_uri") or default_tracking_uri())
        if config.tracking.enabled
        else None
    )
    inputs = {"data": data, "val_data": val_data, "num_images": train.num_images, "tracking_uri": tracking_uri}
    write_json(output, RUN_INPUTS, {**inputs, "scaling": config_dict["scaling"]})
    write_text(output, CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False))
    if restore is not None:
        remove_file(output, SUMMARY)  # it described the run before this resume; rewritten at the end
    tracker = Tracker(tracking_uri, config.tracking.enabled)
    relay: ConsoleRelay | None = None
    try:
        if restore is not None and restore.state.mlflow_run_id:
            tracker.attach(restore.state.mlflow_run_id, reopen=True)
        else:
            tracker.start(config.tracking.experiment, config.tracking.run_name, config.tracking.parent_run_id)
            tracker.log_params(
                {
                    **flatten(config_dict),
                    "data": ",".join(data),
                    "val_data": ",".join(val_data or []),
                    "num_images": train.num_images,
                    "total_steps": total_steps,
                    "steps_per_epoch": steps_per_epoch,
                    "units_per_group": layout.units_per_group,
                    "reader_lanes": layout.total_lanes,
                }
            )
        import ray

        from pipelines.ingest.ingest_state import IngestState
        from pipelines.pretrain.worker import WORKER_SUMMARY, train_loop_per_worker

        # The run's shared state lives beside the driver, so it outlives lost worker and reader nodes.
        console = RunConsole.options(**on_this_node()).remote()
        relay = ConsoleRelay(console, step=restore.state.step if restore is not None else 0)
        limits = ImageLimits(min_side=config.data.min_side, max_pixels=config.data.max_pixels)
        augment = config.augment.resolve(on_gpu=config.scaling.gpus_per_worker > 0)
        datasets = _eval_datasets(knn_sets, config, limits, layout.total_lanes) if knn_sets is not None else {}
        plan = PretrainPlan(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            num_images=train.num_images or 0,
            run_dir=output,
            collection=ray.put(train),
            layout=layout,
            lane_cpus=lanes.cpus,
            lane_resources=lanes.resources,
            train_view=TwoViewFunction(augment, limits),
            ingest_state=IngestState.options(**on_this_node()).remote(),
            mlflow_run_id=tracker.run_id,
            tracking_uri=tracking_uri,
            has_knn=knn_sets is not None,
            num_classes=max(len(train.class_names), len(val.class_names) if val else 0) or None,
            console=relay.console,
            resume_from=restore.path if restore is not None else None,
            damaged_checkpoints=restore.damaged_paths if restore is not None else (),
        )
        trainer = build_torch_trainer(
            train_loop_per_worker,
            {"config": config_dict, "plan": plan},
            config.scaling,
            output,
            config.checkpoint.keep,
            datasets,
        )
        note(
            f"pretraining: {train.num_images} images, {total_steps} steps of {config.optim.batch_size} "
            f"({steps_per_epoch} per epoch) on {config.scaling.workers} worker(s), {layout.total_lanes} reader "
            f"lane(s), {layout.units_per_group} read unit(s) mixed per group; run directory {output}"
        )
        try:
            result = run_watched(trainer.fit, relay)
        except Exception as error:  # noqa: BLE001 -- reported as one line with the checkpoint to resume from
            newest = newest_recorded_checkpoint(output)
            where = f"; resume from step {newest[1]} with --resume {output}" if newest else ""
            raise RunFailed(f"training failed: {root_cause(error)}{where}") from error
    except KeyboardInterrupt:
        _stop_interrupted(output, tracker, relay)
    except BaseException:
        tracker.finish("FAILED")
        raise

    outcome = read_json(output, WORKER_SUMMARY) or {}
    last = newest_recorded_checkpoint(output)
    steps = outcome.get("steps", 0)
    summary = {
        **outcome,
        "epochs_completed": steps // steps_per_epoch,
        "epochs_planned": round(total_steps / steps_per_epoch, 3),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "num_images": train.num_images,
        "seconds": round(time.time() - started, 1),
        "output": output,
        "checkpoint": last[0] if last else None,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracking_uri,
        "mlflow_ui": ui_command(tracking_uri) if tracking_uri else None,
        "reader_nodes": ray.get(plan.ingest_state.snapshot.remote())["reader_nodes"],
    }
    if result.checkpoint is not None and not outcome.get("stopped"):
        summary["backbone"] = _export_backbone(result.checkpoint, output)
    if local_output is not None:
        curves = _plot_curves(local_output)
        for artifact in (
            local_output / "config.yaml",
            local_output / "backbone.pt",
            curves,
            local_output / "metrics.jsonl",
        ):
            if artifact is not None:
                tracker.log_artifact(artifact)
        if result.checkpoint is not None:
            for name in ("model.pt", "state.json", "config.yaml"):
                tracker.log_artifact(Path(result.checkpoint.path) / name, "checkpoint")
    write_json(output, SUMMARY, summary)
    if outcome.get("stopped"):
        tracker.finish("FAILED")
        kept = summary["checkpoint"]
        raise RunFailed(
            f"{outcome['stopped']}; "
            + (f"the last good checkpoint is {kept}" if kept else "it stopped before its first checkpoint")
        )
    tracker.finish("FINISHED")
    return summary


def _check_same_collection(output: str, recorded: dict[str, Any], data: list[str], train: Collection) -> None:
    """A resumed run continues its exact data order, so it must read the collection it started on:
    the same paths, or a moved copy with as many images (a note says so).

    Raises:
        ConfigError: ``data`` plans to another number of images than the run was started on.
    """
    started_on, count = [absolute_uri(path) for path in recorded.get("data") or []], recorded.get("num_images")
    if not started_on or started_on == data:
        return
    if count is not None and count != train.num_images:
        raise ConfigError(
            f"{output} was started on {', '.join(started_on)} ({count} images); --data {', '.join(data)} holds "
            f"{train.num_images}: a run continues its data order on the collection it started on, so train "
            "on other data in a new run (a new --output)"
        )
    note(f"note: {output} continues on {', '.join(data)} (started on {', '.join(started_on)}), taken as a moved copy")


def _resume_point(output: str) -> IntactCheckpoint | None:
    """The newest intact checkpoint of the run in ``output``, with one warning naming any newer
    damaged ones (or a damaged pointer file); None when the run stopped before its first.

    Raises:
        ConfigError: the run has checkpoints and none is intact (naming the newest one's file).
    """
    try:
        read_pointer(output)
    except DamagedCheckpoint as damage:
        note(f"warning: {damage}; looking for checkpoints in {join(output, TRAIN_DIR)} instead")
    try:
        found = newest_intact_checkpoint(list_checkpoints(output))
    except DamagedCheckpoint as damage:
        raise ConfigError(f"cannot resume {output}: {damage}") from None
    if found is not None and found.damaged:
        note(f"warning: {'; '.join(found.damaged)}; resuming from step {found.state.step} ({found.path})")
    return found


#: The keys that set how long a run is: a finished run resumed with other values trains on.
_LENGTH_KEYS = (("training", "epochs"), ("training", "total_steps"), ("optim", "batch_size"))


def _finished_as_configured(restore: IntactCheckpoint, config: PretrainConfig) -> bool:
    """Whether the checkpoint ends a run planned as long as ``config`` plans it (no data or Ray needed)."""
    if not restore.state.total_steps or restore.state.step < restore.state.total_steps:
        return False
    saved = yaml.safe_load(read_text(restore.path, CONFIG_FILE) or "null") or {}
    planned = {(section, key): getattr(getattr(config, section), key) for section, key in _LENGTH_KEYS}
    return all(saved.get(section, {}).get(key) == value for (section, key), value in planned.items())


def _already_complete(output: str, restore: IntactCheckpoint, total_steps: int) -> dict[str, Any]:
    note(
        f"{output} is already complete (step {restore.state.step} of {total_steps}); to train it longer, "
        f"give --resume {output} a larger --set training.epochs=N (or training.total_steps=N)"
    )
    summary = {
        "already_complete": True,
        "steps": restore.state.step,
        "total_steps": total_steps,
        "output": output,
        "checkpoint": restore.path,
    }
    if read_json(output, SUMMARY) is None:
        summary |= _finish_stopped_run(output, restore, summary)
    return summary


def _finish_stopped_run(output: str, restore: IntactCheckpoint, summary: dict[str, Any]) -> dict[str, Any]:
    """A run stopped after its final checkpoint but before it finished: write what it lacks,
    ``backbone.pt`` from that checkpoint and ``summary.json`` with the final logged loss and the
    MLflow run (no final kNN: that needs the data)."""
    from ray.train import Checkpoint

    losses = logged_losses(output)
    pointer = read_pointer(output) or {}
    finished = {
        "final_loss": losses[-1] if losses else None,
        "mlflow_run_id": pointer.get("mlflow_run_id"),
        "backbone": _export_backbone(Checkpoint(restore.path), output),
    }
    write_json(output, SUMMARY, {**summary, **finished})
    note(f"{output} stopped after its final checkpoint: wrote its backbone and summary from it")
    return finished


def _stop_interrupted(output: str, tracker: Tracker, relay: ConsoleRelay | None) -> NoReturn:
    """After Ctrl-C (or SIGTERM): mark the MLflow run KILLED, stop Ray, and raise :class:`Interrupted`
    saying where the run stopped and how to continue it. A second Ctrl-C meanwhile exits at once."""
    previous = signal.signal(signal.SIGINT, _exit_at_once)
    try:
        step = 0
        if relay is not None:
            try:
                relay.relay(timeout=2.0)
            except Exception:  # noqa: BLE001 -- the step the workers last reported will do
                pass
            step = relay.step
        tracker.finish("KILLED")
        stop_ray()
    finally:
        signal.signal(signal.SIGINT, previous)
    newest = newest_recorded_checkpoint(output)
    if newest is None:
        raise Interrupted(
            f"interrupted at step {step}, before the first checkpoint; start it again with "
            f"moco pretrain --resume {output}"
        ) from None
    raise Interrupted(
        f"interrupted at step {step}; the newest checkpoint is step {newest[1]}; continue with "
        f"moco pretrain --resume {output}"
    ) from None


def _exit_at_once(signum: int, frame: Any) -> None:
    """The second Ctrl-C: kill the local Ray processes and exit now (the MLflow run may stay
    RUNNING; a joined cluster ends this driver's actors when it is gone)."""
    os.write(2, b"moco: interrupted twice; stopped at once\n")
    kill_local_ray_now()
    os._exit(130)


def _export_backbone(checkpoint: Any, output: str) -> str:
    """``OUTPUT/backbone.pt`` from the final Ray Train checkpoint (local or in object storage)."""
    import io

    import torch

    from pipelines.pretrain.checkpoints import load_backbone_state

    with checkpoint.as_directory() as directory:
        state = load_backbone_state(Path(directory))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(output, BACKBONE, buffer.getvalue())
    return join(output, BACKBONE)


def _plot_curves(output: Path) -> Path | None:
    """loss and kNN top-1 against steps, from metrics.jsonl (None without matplotlib or metrics)."""
    import json

    metrics_path = output / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    knn = [(row["step"], row["knn_top1"]) for row in rows if row.get("knn_top1") is not None]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if loss:
        axes[0].plot(*zip(*loss))
    axes[0].set(title="InfoNCE loss", xlabel="step")
    if knn:
        axes[1].plot(*zip(*knn), marker="o")
    axes[1].set(title="kNN top-1 (%)", xlabel="step")
    figure.tight_layout()
    path = output / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def load_run_for_resume(output: str, overrides: list[str]) -> tuple[PretrainConfig, dict[str, Any]]:
    """The config and inputs of the run in ``output``, with ``overrides`` applied on top.

    Raises:
        ConfigError: ``output`` holds no resumable run.
    """
    from pipelines.config import apply_overrides

    inputs, config_text = read_json(output, RUN_INPUTS), read_text(output, CONFIG_FILE)
    if inputs is None or config_text is None:
        raise ConfigError(f"{output} holds no run to resume (needs {CONFIG_FILE} and {RUN_INPUTS})")
    data = apply_overrides(yaml.safe_load(config_text), overrides)
    return config_from_mapping(data), inputs
