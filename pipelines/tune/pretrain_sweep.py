"""``moco tune momentum`` and ``moco tune mechanism``: one pretraining run per trial, then the
cached linear probe (a small lr grid) on its backbone.

A trial is a Tune function that acts as the driver of its own Ray Train run
(:func:`pipelines.pretrain.driver.run_pretraining` builds the ``TorchTrainer``, which asks for its
own workers): the trial reserves no CPU, and ``max_concurrent`` keeps the concurrent trainers
within the cluster. The trial's work runs in a zero-CPU task outside the trial's placement group,
so the trainer's workers, its reader lanes and the feature extraction are scheduled on the cluster
rather than inside the trial's (empty) reservation.

A trial **fails** (status ``fail``, as the paper's m=0 row) when its loss becomes non-finite (the
run stops itself: :class:`~pipelines.pretrain.driver.RunFailed`) or when its pretext loss
oscillates without decreasing at the end, or sits at the chance level (:func:`loss_verdict`); it
is reported, not raised, and
the sweep goes on. Anything else a trial raises makes it ``error`` with the message.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, apply_overrides, flatten
from pipelines.console import note
from pipelines.pretrain.config import PretrainConfig, config_from_mapping, config_to_dict
from pipelines.pretrain.run_files import logged_losses
from pipelines.tune.plots import mechanism_plot, momentum_plot
from pipelines.tune.sweep import (
    TRIALS_DIR,
    check_output,
    finish_sweep,
    flat_point,
    json_override,
    parent_marked_failed_on_error,
    run_trials,
    start_sweep,
)
from tune_spaces.common import Point, trial_name
from tune_spaces.mechanism import mechanism_overrides, mechanism_points
from tune_spaces.momentum import PROBE_LRS, momentum_points

METRICS = ("probe", "knn")
#: Relative swing (the back-and-forth movement per log step / mean) of the last window's loss above
#: which a loss that is not decreasing counts as oscillating.
OSCILLATION_TOLERANCE = 0.05
#: Fewest logged losses the oscillation rule judges.
MIN_LOSSES = 4
#: A last window whose mean loss is within this share of the chance-level loss (either side)
#: counts as collapsed.
COLLAPSE_BAND = 0.005


@dataclass(frozen=True)
class TrialProbe:
    """How each pretraining trial is scored.

    Attributes:
        metric: ``probe``: the best top-1 of the cached linear probe over ``lrs``; ``knn``: the
            run's own kNN top-1 (no probe).
        lrs: the probe's lr grid.
        recipe: the probe recipe (``lincls``).
        overrides: probe config overrides (``optim.epochs=20``, ...).
        train, val: labelled collections of the probe (default: the sweep's --data / --val-data).
    """

    metric: str = "probe"
    lrs: tuple[float, ...] = PROBE_LRS
    recipe: str = "lincls"
    overrides: tuple[str, ...] = ()
    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()


@dataclass(frozen=True)
class PretrainTrialPlan:
    """What every trial of a pretraining sweep shares (decided once by the driver).

    Attributes:
        kind: ``momentum`` or ``mechanism`` (how a point becomes config keys).
        config: the base pretraining config (recipe and --set overrides), as a mapping.
        data, val_data: the pretraining collections.
        output: the sweep directory; trial ``T`` runs in ``OUTPUT/trials/T/pretrain``.
        probe: how trials are scored.
        tracking: ``tracking.*`` overrides nesting each run under the sweep's parent run.
        oscillation_tolerance: see :func:`loss_verdict`.
    """

    kind: str
    config: dict[str, Any]
    data: tuple[str, ...]
    val_data: tuple[str, ...]
    output: str
    probe: TrialProbe
    tracking: tuple[str, ...] = field(default_factory=tuple)
    oscillation_tolerance: float = OSCILLATION_TOLERANCE


def chance_loss(config: PretrainConfig) -> float:
    """The InfoNCE loss when every candidate key is equally similar to the query: ln(candidates),
    with 1 + K candidates for ``moco`` and ``memory_bank`` and the global batch for ``end_to_end``."""
    model = config.model
    candidates = config.optim.batch_size if model.mechanism == "end_to_end" else 1 + model.queue_size
    return math.log(candidates)


def _swing(window: list[float], mean: float) -> float:
    """How far the loss moves back and forth per log step, as a share of its mean: the distance it
    travels beyond its net change (first to last value), halved (a reversal is travelled out and
    back), per step. A monotone window has none however steep or curved; ``a, b, a, b, ...`` about
    ``|b - a| / 2`` per step."""
    travel = sum(abs(after - before) for before, after in zip(window, window[1:]))
    back_and_forth = (travel - abs(window[-1] - window[0])) / 2
    return back_and_forth / (len(window) - 1) / abs(mean) if mean else math.inf


def loss_verdict(
    losses: list[float],
    tolerance: float = OSCILLATION_TOLERANCE,
    min_points: int = MIN_LOSSES,
    chance: float | None = None,
) -> tuple[str, str]:
    """``("ok" | "fail", why)`` for a run's logged pretext losses, in step order.

    The rule: a run fails when any loss is non-finite, or when over its last window (the last
    quarter of the logged losses, at least ``min_points``) the loss

    * is not decreasing (its least-squares slope is >= 0) while swinging up and down by more than
      ``tolerance`` of its mean per log step (:func:`_swing`): it oscillates instead of
      converging. A rise is not a swing, however steep or curved: MoCo's loss rises early in
      training, while the queue fills with keys of an encoder that is learning; or
    * has a mean within ``COLLAPSE_BAND`` of ``chance`` (:func:`chance_loss`, when given): the
      encoder collapsed, every key as similar to a query as its positive. Well above chance is
      not collapse: a memory bank's positives are its stale, at first random, entries, and its
      loss starts far above chance and falls towards it.

    A loss that plateaus smoothly away from chance, or keeps falling, is fine; runs with fewer than
    ``min_points`` logged losses are not judged.
    """
    if any(not math.isfinite(value) for value in losses):
        return "fail", "the loss became non-finite"
    if len(losses) < min_points:
        return "ok", f"not judged: {len(losses)} logged losses (fewer than {min_points})"
    window = losses[-max(min_points, len(losses) // 4) :]
    count = len(window)
    mean = sum(window) / count
    center = (count - 1) / 2
    slope = sum((i - center) * (value - mean) for i, value in enumerate(window)) / sum(
        (i - center) ** 2 for i in range(count)
    )
    swing = _swing(window, mean)
    if slope >= 0 and swing > tolerance:
        return "fail", (
            f"the pretext loss oscillates: not decreasing over its last {count} logged values "
            f"(slope {slope:+.3g} per log step) and swinging up and down by {100 * swing:.0f}% of its mean "
            "per log step"
        )
    if chance is not None and abs(mean - chance) <= COLLAPSE_BAND * chance:
        return "fail", (
            f"the pretext loss collapsed to chance: its last {count} logged values average {mean:.4g}, "
            f"the loss of uniform similarities is {chance:.4g} (every key as close as the positive)"
        )
    return "ok", f"last {count} logged losses: slope {slope:+.3g} per log step, swing {100 * swing:.0f}%"


def trial_overrides(kind: str, point: Point) -> dict[str, Any]:
    """The config keys a point sets."""
    return mechanism_overrides(point) if kind == "mechanism" else dict(point)


def trial_config(plan: PretrainTrialPlan, point: Point, name: str) -> PretrainConfig:
    """The pretraining config of one trial (validated)."""
    overrides = [json_override(key, value) for key, value in trial_overrides(plan.kind, point).items()]
    return config_from_mapping(apply_overrides(plan.config, [*overrides, *plan.tracking, f"tracking.run_name={name}"]))


def _probe(run_dir: Path, trial_dir: Path, plan: PretrainTrialPlan) -> dict[str, Any]:
    """The cached probe of the run's backbone over the lr grid: the best lr's top-1 / top-5."""
    import torch

    from moco_core.linear_probe import train_linear_classifier
    from pipelines.evaluate.backbones import load_backbone
    from pipelines.evaluate.features import extract_cached_features
    from pipelines.evaluate.probe_config import load_probe_config, resolve_view

    probe = plan.probe
    config = load_probe_config(probe.recipe, [*probe.overrides, "tracking.enabled=false"])
    backbone = load_backbone(str(run_dir))
    view = resolve_view(config, backbone.provenance.get("config"))
    train, val = list(probe.train or plan.data), list(probe.val or plan.val_data)
    features = extract_cached_features(backbone, train, val, config, view, str(trial_dir / "features"))
    tensors = [
        torch.from_numpy(array)
        for array in (features.train.features, features.train.labels, features.val.features, features.val.labels)
    ]
    by_lr: dict[str, float] = {}
    best: dict[str, Any] = {}
    for lr in probe.lrs:
        result = train_linear_classifier(
            *tensors, features.num_classes, replace(config.linear, lr=lr), eval_every_epochs=0
        )
        assert result.final is not None
        by_lr[f"{lr:g}"] = result.final.top1
        if not best or result.final.top1 > best["top1"]:
            best = {"top1": result.final.top1, "top5": result.final.top5, "probe_lr": lr}
    return {**best, "probe_top1_by_lr": json.dumps(by_lr), "probe_epochs": config.optim.epochs}


def pretrain_and_probe(plan: PretrainTrialPlan, point: Point) -> dict[str, Any]:
    """One trial's work: pretrain (or continue an interrupted run), judge the loss, probe.

    Returns the trial's row (without its point): ``status``, ``top1``, ``final_loss``, ...
    """
    from pipelines.pretrain.checkpoints import holds_run, read_pointer
    from pipelines.pretrain.driver import SUMMARY, RunFailed, run_pretraining
    from pipelines.pretrain.run_files import read_json

    name = trial_name(point)
    trial_dir = Path(plan.output) / TRIALS_DIR / name
    run_dir = trial_dir / "pretrain"
    config = trial_config(plan, point, name)
    previous = read_json(str(run_dir), SUMMARY)
    try:
        if previous is not None and not previous.get("stopped"):
            summary = previous  # pretrained before the sweep was interrupted: only the probe is left
        else:
            resume = holds_run(str(run_dir))  # its checkpoints (a damaged pointer file is passed over)
            summary = run_pretraining(config, list(plan.data), str(run_dir), list(plan.val_data) or None, resume)
    except RunFailed as error:
        summary = read_json(str(run_dir), SUMMARY) or {}
        pointer = read_pointer(str(run_dir)) or {}
        run_id = summary.get("mlflow_run_id", pointer.get("mlflow_run_id"))
        row = {"status": "fail", "reason": str(error), "final_loss": summary.get("final_loss")}
        row |= {"steps": summary.get("steps"), "mlflow_run_id": run_id}
        _tag_trial_run(row, summary.get("tracking_uri"))
        return row
    verdict, why = loss_verdict(logged_losses(str(run_dir)), plan.oscillation_tolerance, chance=chance_loss(config))
    row: dict[str, Any] = {
        "status": verdict,
        "final_loss": summary.get("final_loss"),
        "knn_top1": summary.get("knn_top1"),
        "steps": summary.get("steps"),
        "pretrain_seconds": summary.get("seconds"),
        "images_per_s": summary.get("images_per_s"),
        "run": str(run_dir),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "loss_check": why,
    }
    if verdict == "fail":
        row["reason"] = why
    elif plan.probe.metric == "probe":
        row |= _probe(run_dir, trial_dir, plan)
    else:
        row["top1"] = summary.get("knn_top1")
    _tag_trial_run(row, summary.get("tracking_uri"))
    return row


def _tag_trial_run(row: dict[str, Any], tracking_uri: str | None) -> None:
    """The sweep's verdict and scores on the trial's own (pretraining) MLflow run."""
    from pipelines.pretrain.tracking import Tracker

    if not row.get("mlflow_run_id") or not tracking_uri:
        return
    tracker = Tracker(tracking_uri, True)
    tracker.attach(row["mlflow_run_id"])
    tracker.set_tags({"sweep_status": row["status"], **({"reason": row["reason"][:5000]} if row.get("reason") else {})})
    scores = {key: row[key] for key in ("top1", "top5", "probe_lr") if isinstance(row.get(key), (int, float))}
    if scores:
        tracker.log_metrics({f"sweep_{key}": value for key, value in scores.items()}, int(row.get("steps") or 0))


def pretrain_trial(trial: dict[str, Any], plan: PretrainTrialPlan) -> None:
    """One Tune trial: :func:`pretrain_and_probe` in a zero-CPU task outside the trial's placement
    group (Tune captures a trial's child tasks in its reservation, which holds no CPU), reported once."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = time.time()
    task = ray.remote(num_cpus=0, max_retries=0)(pretrain_and_probe).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
    )
    reference = task.remote(plan, trial["trial"])
    try:
        row = ray.get(reference)
    except BaseException:
        ray.cancel(reference, force=True)
        raise
    tune.report({**row, "finished": 1, "started": started, "ended": time.time()})


# ------------------------------------------------------------------------------------ the drivers


def _default_concurrency(config: PretrainConfig) -> int:
    """Trainers that fit at once: by GPUs when trials use them; on CPUs one (every trainer's
    reader lanes take the CPUs its workers leave free)."""
    import ray

    gpus_per_trial = config.scaling.workers * config.scaling.gpus_per_worker
    if gpus_per_trial > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_trial))
    return 1


def _check_scoring(plan: PretrainTrialPlan) -> None:
    """How trials are judged and scored is valid (before Ray starts): the oscillation tolerance,
    the metric, and the probe's config, lrs and labelled collections."""
    from pipelines.evaluate.features import plan_labelled
    from pipelines.evaluate.probe_config import load_probe_config

    tolerance = plan.oscillation_tolerance
    if not 0 <= tolerance < math.inf:
        raise ConfigError(f"--oscillation-tolerance {tolerance:g}: expected a share of the loss's mean >= 0, e.g. 0.05")
    if plan.probe.metric not in METRICS:
        raise ConfigError(f"unknown metric {plan.probe.metric!r}; choose one of {', '.join(METRICS)}")
    if plan.probe.metric == "knn":
        if not plan.val_data:
            raise ConfigError("--metric knn needs labelled --val-data (the runs' kNN monitor)")
        return
    try:
        config = load_probe_config(plan.probe.recipe, [*plan.probe.overrides, "tracking.enabled=false"])
    except ConfigError as error:
        raise ConfigError(f"the probe's config (--probe-recipe, --probe-set): {error}") from None
    if not plan.probe.lrs:
        raise ConfigError("--probe-lrs: expected at least one lr")
    for lr in plan.probe.lrs:
        try:
            replace(config.linear, lr=lr).validate()
        except ValueError as error:
            raise ConfigError(f"--probe-lrs: {error}") from None
    if not (plan.probe.val or plan.val_data):
        raise ConfigError("the probe needs labelled validation data: give --val-data or --probe-val")
    plan_labelled(list(plan.probe.train or plan.data), config, "--probe-train (default: --data)")
    plan_labelled(list(plan.probe.val or plan.val_data), config, "--probe-val (default: --val-data)")


def _run_pretrain_sweep(
    kind: str,
    config: PretrainConfig,
    data: list[str],
    val_data: list[str] | None,
    output: str,
    points: list[Point],
    dropped: list[dict[str, Any]],
    probe: TrialProbe,
    max_concurrent: int | None,
    oscillation_tolerance: float,
    resume: bool,
    inputs: dict[str, Any],
    stop_after_trials: int,
) -> dict[str, Any]:
    from ray import tune

    from pipelines.ray_runtime import ensure_ray
    from pipelines.train_jobs import check_cluster

    started = time.time()
    base = config_to_dict(config)
    draft = PretrainTrialPlan(kind, base, tuple(data), tuple(val_data or ()), "", probe, (), oscillation_tolerance)
    for point in points:
        try:
            trial_config(draft, point, trial_name(point))
        except ConfigError as error:
            raise ConfigError(f"{kind} space point {point}: {error}") from None
    _check_scoring(draft)
    check_output(output, resume)
    # Each trial's trainer is checked again inside the trial, where the cluster never counts as
    # fixed: a trainer asking for GPUs no node has would wait there for ever.
    check_cluster(config.scaling, config.data.reader_resources, fixed=ensure_ray())
    params = {
        "data": ",".join(data),
        "val_data": ",".join(val_data or []),
        "metric": probe.metric,
        "probe_lrs": ",".join(f"{lr:g}" for lr in probe.lrs),
        **flatten(base),
    }
    state = start_sweep(kind, output, points, inputs, params, config.tracking.uri, config.tracking.enabled, resume)
    with parent_marked_failed_on_error(state):
        tracking = (
            f"tracking.uri={state.tracking_uri}",
            f"tracking.enabled={str(state.tracking_enabled and state.parent_run_id is not None).lower()}",
            "tracking.experiment=moco-tune",
            *([f"tracking.parent_run_id={state.parent_run_id}"] if state.parent_run_id else []),
        )
        plan = replace(draft, output=state.output, tracking=tracking)
        concurrency = max_concurrent or _default_concurrency(config)
        trainable = tune.with_resources(tune.with_parameters(pretrain_trial, plan=plan), {"CPU": 0, "memory": 1})
        note(
            f"tune {kind}: {len(state.points)} pretraining runs, {concurrency} at a time, each on "
            f"{config.scaling.workers} worker(s); scored by {probe.metric}; sweep directory {state.output}"
        )
        outcomes = run_trials(state, trainable, concurrency, None, stop_after_trials)
        rows = []
        for point, metrics, error in outcomes:
            row: dict[str, Any] = {"trial": trial_name(point), **flat_point(point)}
            if error is not None:
                row |= {"status": "error", "reason": error}
            elif metrics is None:
                row |= {"status": "pending"}
            else:
                row |= {key: value for key, value in metrics.items() if key not in ("finished", "trial")}
            rows.append(row)
        for point in dropped:  # end-to-end batches that do not fit: in the table, not run
            rows.append(
                {"trial": trial_name({k: v for k, v in point.items() if k != "reason"}), **point, "status": "skipped"}
            )
        keys = list(dict.fromkeys(key for point in state.points for key in point))
        columns = [
            "trial",
            *keys,
            "status",
            "top1",
            "top5",
            "probe_lr",
            "knn_top1",
            "final_loss",
            "steps",
            "pretrain_seconds",
            "reason",
            "mlflow_run_id",
        ]
        plot = momentum_plot if kind == "momentum" else mechanism_plot
        extra = {"metric": probe.metric, "dropped": dropped}
        return finish_sweep(state, rows, columns, plot, started, extra, stopped_on_purpose=bool(stop_after_trials))


def run_momentum_sweep(
    config: PretrainConfig,
    data: list[str],
    val_data: list[str] | None,
    output: str,
    space: str | list[Point] = "paper",
    values: list[float] | None = None,
    probe: TrialProbe = TrialProbe(),
    max_concurrent: int | None = None,
    oscillation_tolerance: float = OSCILLATION_TOLERANCE,
    resume: bool = False,
    stop_after_trials: int = 0,
) -> dict[str, Any]:
    """The momentum sweep: one pretraining run per m (then the probe); returns every trial's row.

    Args:
        config: the base pretraining config (recipe and overrides, scaling per trial).
        data, val_data: the pretraining collections (``val_data`` labelled: kNN and the probe).
        output: the sweep directory (local).
        space: a built-in space (``paper``), a YAML file, or the points themselves.
        values: replaces the space's ``momentum.base`` axis.
        probe: how each trial is scored (the cached probe over a small lr grid, or kNN).
        max_concurrent: pretraining runs at once (default: what the cluster's GPUs fit, on CPUs 1).
        oscillation_tolerance: see :func:`loss_verdict`.
        resume: continue the sweep in ``output``.
        stop_after_trials: testing aid: end the run after this many finished trials.

    Returns:
        ``rows`` (per trial: ``momentum.base``, ``status`` ok / fail / error, ``top1``, ``probe_lr``,
        ``knn_top1``, ``final_loss``, ``reason``, ``mlflow_run_id``), ``best``, ``table``, ``plot``, ...
    """
    points = list(space) if isinstance(space, list) else momentum_points(space, values)
    inputs = _inputs(config, data, val_data, probe, max_concurrent, oscillation_tolerance) | {"points": points}
    return _run_pretrain_sweep(
        "momentum",
        config,
        data,
        val_data,
        output,
        points,
        [],
        probe,
        max_concurrent,
        oscillation_tolerance,
        resume,
        inputs,
        stop_after_trials,
    )


def run_mechanism_sweep(
    config: PretrainConfig,
    data: list[str],
    val_data: list[str] | None,
    output: str,
    space: str | list[Point] = "paper",
    ks: list[int] | None = None,
    mechanisms: list[str] | None = None,
    end_to_end_max_batch: int | None = None,
    probe: TrialProbe = TrialProbe(),
    max_concurrent: int | None = None,
    oscillation_tolerance: float = OSCILLATION_TOLERANCE,
    resume: bool = False,
    stop_after_trials: int = 0,
) -> dict[str, Any]:
    """The mechanism x K sweep (the paper's Figure 3); returns every trial's row.

    End-to-end's K is its batch (``optim.batch_size``): points above ``end_to_end_max_batch`` or
    the training set's size are dropped (listed as ``skipped``). Other arguments as
    :func:`run_momentum_sweep`.
    """
    from pipelines.ingest.planning import plan_collection
    from pipelines.ingest.units import ColumnNames

    dropped: list[dict[str, Any]] = []
    if isinstance(space, list):
        points = space
    else:
        columns = ColumnNames(config.data.image_column, config.data.label_column, config.data.key_column)
        num_images = plan_collection(data, config.data.layout, columns).num_images
        points, dropped = mechanism_points(space, ks, mechanisms, num_images, end_to_end_max_batch)
    inputs = _inputs(config, data, val_data, probe, max_concurrent, oscillation_tolerance) | {
        "points": points,
        "dropped": dropped,
    }
    return _run_pretrain_sweep(
        "mechanism",
        config,
        data,
        val_data,
        output,
        points,
        dropped,
        probe,
        max_concurrent,
        oscillation_tolerance,
        resume,
        inputs,
        stop_after_trials,
    )


def _inputs(
    config: PretrainConfig,
    data: list[str],
    val_data: list[str] | None,
    probe: TrialProbe,
    max_concurrent: int | None,
    oscillation_tolerance: float,
) -> dict[str, Any]:
    return {
        "config": config_to_dict(config),
        "data": data,
        "val_data": val_data,
        "probe": {**probe.__dict__, "lrs": list(probe.lrs), "overrides": list(probe.overrides)},
        "max_concurrent": max_concurrent,
        "oscillation_tolerance": oscillation_tolerance,
    }


def resume_pretrain_sweep(kind: str, output: str, inputs: dict[str, Any], stop_after_trials: int = 0) -> dict[str, Any]:
    """Continue the ``kind`` sweep in ``output`` with the inputs it was started with."""
    probe_inputs = inputs["probe"]
    probe = TrialProbe(
        probe_inputs["metric"],
        tuple(probe_inputs["lrs"]),
        probe_inputs["recipe"],
        tuple(probe_inputs["overrides"]),
        tuple(probe_inputs["train"]),
        tuple(probe_inputs["val"]),
    )
    return _run_pretrain_sweep(
        kind,
        config_from_mapping(inputs["config"]),
        inputs["data"],
        inputs["val_data"],
        output,
        inputs["points"],
        inputs.get("dropped", []),
        probe,
        inputs["max_concurrent"],
        inputs["oscillation_tolerance"],
        True,
        inputs,
        stop_after_trials,
    )
