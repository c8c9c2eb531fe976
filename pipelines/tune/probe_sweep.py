"""``moco tune probe``: grid search of the linear layer (lr x weight decay, ...) on a frozen backbone.

The backbone's features are extracted once (:func:`pipelines.evaluate.features.extract_cached_features`,
cached in ``OUTPUT/features``) and put in the Ray object store; every trial reads them from
there and trains the fc layer with its own settings (:func:`moco_core.linear_probe.train_linear_classifier`)
in its Tune actor. A trial reserves ``cpus_per_trial`` (default half a CPU) and ``gpus_per_trial``,
so several run at once; each reports its validation top-1 after every epoch, which ASHA
(``scheduler="asha"``) uses to stop the weak ones early.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import ConfigError, apply_overrides, flatten, to_dict
from pipelines.console import note
from pipelines.evaluate.probe_config import ProbeConfig, probe_config_from_mapping
from pipelines.pretrain.tracking import Tracker
from pipelines.tune.plots import probe_heatmap
from pipelines.tune.sweep import (
    EXPERIMENT,
    SweepState,
    check_output,
    finish_sweep,
    flat_point,
    json_override,
    parent_marked_failed_on_error,
    run_trials,
    start_sweep,
)
from tune_spaces.common import Point, trial_name
from tune_spaces.probe_grid import DEFAULT_SPACE, probe_grid_points

SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class ProbeTrialPlan:
    """What every probe trial shares (decided once by the driver).

    Attributes:
        config: the base probe config (a point's keys are applied on top).
        num_classes: outputs of the fc layer.
        threads: torch threads of a trial (its reserved CPUs, rounded up).
        use_gpu: train on the trial's GPU.
    """

    config: dict[str, Any]
    num_classes: int
    threads: int
    use_gpu: bool


def point_config(base: dict[str, Any], point: Point) -> ProbeConfig:
    """The probe config of one trial: ``base`` with the point's keys set (validated)."""
    return probe_config_from_mapping(apply_overrides(base, [json_override(k, v) for k, v in point.items()]))


def probe_trial(trial_config: dict[str, Any], plan: ProbeTrialPlan, features: tuple[np.ndarray, ...]) -> None:
    """One Tune trial: train the fc layer with this point's settings; report every epoch."""
    import torch
    from ray import tune

    from moco_core.linear_probe import EpochRecord, train_linear_classifier

    started = time.time()
    config = point_config(plan.config, trial_config["trial"])
    torch.set_num_threads(plan.threads)
    device = torch.device("cuda" if plan.use_gpu and torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():  # the object store's arrays are read-only; training only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        train_x, train_y, val_x, val_y = (torch.from_numpy(array).to(device) for array in features)
    epochs = config.optim.epochs
    latest: dict[str, float] = {"val_top1": 0.0, "val_top5": 0.0}

    def on_epoch(record: EpochRecord) -> None:
        if record.val is not None:
            latest.update(val_top1=record.val.top1, val_top5=record.val.top5)
        metrics: dict[str, Any] = {
            "epoch": record.epoch + 1,
            "train_loss": record.train_loss,
            "train_top1": record.train_top1,
            **latest,
            "started": started,
        }
        if record.epoch + 1 == epochs:
            metrics |= {"top1": latest["val_top1"], "top5": latest["val_top5"], "finished": 1, "ended": time.time()}
        tune.report(metrics)

    train_linear_classifier(
        train_x,
        train_y,
        val_x,
        val_y,
        plan.num_classes,
        config.linear,
        eval_every_epochs=config.training.eval_every_epochs,
        on_epoch=on_epoch,
    )


def _row(point: Point, metrics: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"trial": trial_name(point), **flat_point(point)}
    if error is not None:
        return row | {"status": "error", "reason": error}
    if metrics is None:
        return row | {"status": "pending"}
    finished = bool(metrics.get("finished"))
    row |= {
        "status": "ok" if finished else "stopped",
        "top1": metrics.get("top1") if finished else metrics.get("val_top1"),
        "top5": metrics.get("top5") if finished else metrics.get("val_top5"),
        "epochs": metrics.get("epoch"),
        "train_loss": metrics.get("train_loss"),
        "started": metrics.get("started"),
        "ended": metrics.get("ended"),
    }
    if not finished:
        row["reason"] = f"stopped by ASHA after epoch {metrics.get('epoch')}"
    return row


def _log_trial_runs(state: SweepState, rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """One MLflow run per trial, nested under the sweep's: its config as params, its final metrics.

    Logged here, from the results, rather than by the trials: a trial ASHA stopped has its run
    too, and concurrent trials do not contend for the tracking store."""
    if state.parent_run_id is None:
        return
    for row in rows:
        if row["status"] == "pending" or row["trial"] in state.trial_runs:
            continue
        tracker = Tracker(state.tracking_uri, state.tracking_enabled)
        tracker.start(EXPERIMENT, row["trial"], state.parent_run_id)
        point = next(point for point in state.points if trial_name(point) == row["trial"])
        tracker.log_params({**flatten(base), **point, "status": row["status"]})
        final = {key: row[key] for key in ("top1", "top5", "train_loss") if isinstance(row.get(key), (int, float))}
        tracker.log_metrics(final, int(row.get("epochs") or 0))
        if row.get("reason"):
            tracker.set_tags({"reason": str(row["reason"])[:5000]})
        tracker.finish({"ok": "FINISHED", "stopped": "KILLED"}.get(row["status"], "FAILED"))
        if tracker.run_id is not None:
            row["mlflow_run_id"] = state.trial_runs[row["trial"]] = tracker.run_id
    for row in rows:
        row.setdefault("mlflow_run_id", state.trial_runs.get(row["trial"]))
    state.save()


def _check_trial_fits(cpus_per_trial: float, gpus_per_trial: float, fixed: bool) -> None:
    """On a cluster that cannot grow (``fixed``: the local one this process started) one trial's
    reservation must fit: Tune would otherwise wait for it for ever."""
    import ray

    if not fixed:
        return
    cluster = ray.cluster_resources()
    for option, asked, resource in (
        ("--cpus-per-trial", cpus_per_trial, "CPU"),
        ("--gpus-per-trial", gpus_per_trial, "GPU"),
    ):
        have = cluster.get(resource, 0)
        if asked > have:
            raise ConfigError(
                f"{option} {asked:g}: a trial asks for {asked:g} {resource}s and this machine has {have:g}; "
                f"lower {option}, or join a cluster that has them (RAY_ADDRESS)"
            )


def _asha(points: list[Point], base: ProbeConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    epochs = max(int(point.get("optim.epochs", base.optim.epochs)) for point in points)
    return ASHAScheduler(
        time_attr="epoch", metric="val_top1", mode="max", max_t=epochs, grace_period=max(1, epochs // 10)
    )


def run_probe_sweep(
    backbone: str,
    train: list[str],
    val: list[str],
    output: str,
    config: ProbeConfig,
    space: str | list[Point] = DEFAULT_SPACE,
    scheduler: str = "fifo",
    max_concurrent: int | None = None,
    cpus_per_trial: float = 0.5,
    gpus_per_trial: float = 0.0,
    resume: bool = False,
    stop_after_trials: int = 0,
) -> dict[str, Any]:
    """Grid-search the linear probe of ``backbone``; returns the summary with every trial's row.

    Args:
        backbone: any SOURCE of :func:`pipelines.evaluate.backbones.load_backbone`.
        train, val: labelled collections.
        output: the sweep directory (local).
        config: the base probe config (the ``cached`` probe's; each point overrides its keys).
        space: a built-in space name, a YAML file, or the points themselves.
        scheduler: ``fifo`` (every trial runs its epochs) or ``asha`` (weak trials stop early).
        max_concurrent: trials at once (None: as many as the reserved resources allow).
        cpus_per_trial, gpus_per_trial: what each trial reserves.
        resume: continue the sweep in ``output`` (its own inputs; finished trials are not rerun).
        stop_after_trials: testing aid: end the run once this many trials finished, as an interruption.

    Returns:
        ``rows`` (per trial: its point, ``status``, ``top1``, ``top5``, ``epochs``, ``mlflow_run_id``),
        ``best``, ``table``, ``markdown``, ``plot``, ``features``, ``output``, ``mlflow_run_id``, ...

    Raises:
        ConfigError: a bad space or point, an unknown scheduler, a directory that holds a sweep.
    """
    from ray import tune

    from pipelines.evaluate.backbones import load_backbone
    from pipelines.evaluate.features import extract_cached_features
    from pipelines.evaluate.probe_config import resolve_view
    from pipelines.filesystems import join
    from pipelines.ray_runtime import ensure_ray

    started = time.time()
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if cpus_per_trial <= 0 and gpus_per_trial <= 0:
        raise ConfigError("--cpus-per-trial: a probe trial trains in its own actor and needs some CPU (or a GPU)")
    points = list(space) if isinstance(space, list) else probe_grid_points(space)
    base = to_dict(config)
    for point in points:
        try:
            point_config(base, point)
        except ConfigError as error:
            raise ConfigError(f"probe space point {point}: {error}") from None
    inputs = {
        "backbone": backbone,
        "train": train,
        "val": val,
        "config": base,
        "scheduler": scheduler,
        "max_concurrent": max_concurrent,
        "cpus_per_trial": cpus_per_trial,
        "gpus_per_trial": gpus_per_trial,
    }
    params = {"backbone": backbone, "train": ",".join(train), "val": ",".join(val), "scheduler": scheduler}
    check_output(output, resume)
    loaded = load_backbone(backbone, config.model.arch, config.model.small_image_stem)
    view = resolve_view(config, loaded.provenance.get("config"))
    _check_trial_fits(cpus_per_trial, gpus_per_trial, fixed=ensure_ray())
    state = start_sweep(
        "probe", output, points, inputs, params | flatten(base), config.tracking.uri, config.tracking.enabled, resume
    )
    with parent_marked_failed_on_error(state):
        features = extract_cached_features(loaded, train, val, config, view, join(state.output, "features"))
        plan = ProbeTrialPlan(base, features.num_classes, max(1, math.ceil(cpus_per_trial)), gpus_per_trial > 0)
        arrays = (features.train.features, features.train.labels, features.val.features, features.val.labels)
        trainable = tune.with_resources(
            tune.with_parameters(probe_trial, plan=plan, features=arrays),
            {"CPU": cpus_per_trial, **({"GPU": gpus_per_trial} if gpus_per_trial else {})},
        )
        note(
            f"tune probe: {len(state.points)} trials on {features.train.num_images} cached training features "
            f"({scheduler}, {cpus_per_trial:g} CPU / {gpus_per_trial:g} GPU per trial); sweep directory {state.output}"
        )
        outcomes = run_trials(
            state,
            trainable,
            max_concurrent,
            _asha(list(state.points), config) if scheduler == "asha" else None,
            stop_after_trials,
        )
        rows = [_row(point, metrics, error) for point, metrics, error in outcomes]
        _log_trial_runs(state, rows, base)
        keys = list(dict.fromkeys(key for point in state.points for key in point))
        columns = ["trial", *keys, "status", "top1", "top5", "epochs", "train_loss", "reason", "mlflow_run_id"]
        extra = {"features": features.directory, "features_reused": features.reused, "backbone": backbone}
        return finish_sweep(
            state, rows, columns, probe_heatmap, started, extra, stopped_on_purpose=bool(stop_after_trials)
        )
