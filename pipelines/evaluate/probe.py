"""``moco probe``: the linear classification protocol on a frozen backbone, ``full`` or ``cached``.

:func:`run_probe` is a plain function (Tune trials call it) returning a dict; the command is a
thin wrapper. Both modes train the same fc layer with the same optimiser and schedule
(:mod:`moco_core.linear_probe`):

* ``full`` -- the paper's protocol on Ray Train workers (:mod:`pipelines.evaluate.probe_worker`):
  a fresh RandomResizedCrop + flip view of every training image every epoch, through the frozen
  backbone, with checkpoints and ``--resume``, and the backbone sanity check at the end.
* ``cached`` -- features extracted once by Ray Data (:mod:`pipelines.evaluate.features`) and
  cached in ``OUTPUT/features``; the fc layer then trains on them in this process in seconds.

Output directory::

    OUTPUT/config.yaml        resolved probe configuration
    OUTPUT/probe.json         inputs (backbone, data, mode) for --resume
    OUTPUT/features/<key>/    cached features (cached mode)
    OUTPUT/train/checkpoint_epoch*/  Ray Train checkpoints (full mode)
    OUTPUT/metrics.jsonl      per-epoch metrics
    OUTPUT/linear.pt          the trained fc layer (weight, bias, class names)
    OUTPUT/summary.json       the returned summary
"""

from __future__ import annotations

import io
import posixpath
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from moco_core.linear_probe import EpochRecord, train_linear_classifier
from pipelines.cli_common import UserError
from pipelines.config import ConfigError, flatten, to_dict
from pipelines.console import note
from pipelines.evaluate.backbones import Backbone, load_backbone
from pipelines.evaluate.features import extract_cached_features, label_mapping, plan_labelled
from pipelines.evaluate.probe_config import MODES, ProbeConfig, ProbeView, probe_config_from_mapping, resolve_view
from pipelines.filesystems import join, output_directory, resolve_filesystem
from pipelines.pretrain.run_files import read_json, read_text, write_json, write_text
from pipelines.pretrain.tracking import Tracker, default_tracking_uri, ui_command

PROBE_INPUTS = "probe.json"
CONFIG_FILE = "config.yaml"
SUMMARY = "summary.json"
LINEAR_FILE = "linear.pt"


class ProbeFailed(UserError):
    """The probe did not finish, or its backbone changed during training (the sanity check)."""


def feature_dim(backbone: Backbone) -> int:
    """Width of the backbone's pooled features (the fc layer's input)."""
    from moco_core.encoders import build_backbone

    return build_backbone(backbone.arch, backbone.small_image_stem)[1]


def _backbone_params(backbone: Backbone) -> dict[str, Any]:
    provenance = backbone.provenance
    return {
        "backbone.source": backbone.source,
        "backbone.kind": backbone.kind,
        "backbone.arch": backbone.arch,
        "backbone.small_image_stem": backbone.small_image_stem,
        "backbone.step": provenance.get("step"),
        "backbone.mlflow_run_id": provenance.get("mlflow_run_id"),
    }


def _write_linear(output: str, state: dict[str, torch.Tensor], class_names: tuple[str, ...]) -> str:
    filesystem, base = resolve_filesystem(output)
    buffer = io.BytesIO()
    torch.save({"weight": state["weight"], "bias": state["bias"], "class_names": list(class_names)}, buffer)
    with filesystem.open_output_stream(posixpath.join(base, LINEAR_FILE)) as stream:
        stream.write(buffer.getvalue())
    return join(output, LINEAR_FILE)


def run_probe(
    backbone_source: str | Backbone,
    train: list[str],
    val: list[str],
    output: str,
    config: ProbeConfig,
    mode: str = "cached",
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Run the linear probe and return its summary (also written to ``OUTPUT/summary.json``).

    Args:
        backbone_source: any SOURCE :func:`~pipelines.evaluate.backbones.load_backbone` takes, or a
            loaded :class:`Backbone`.
        train, val: labelled collections (paths, globs or URIs).
        output: the probe's directory (local path or URI).
        config: the validated probe config (``tracking.parent_run_id`` nests the MLflow run).
        mode: ``full`` or ``cached``.
        resume: continue the ``full`` probe in ``output`` from its newest checkpoint (one finished
            with ``optim.epochs`` epochs is reported complete at once).
        force: replace the results of a finished cached probe in ``output`` (without it they are
            refused); a full probe's checkpoints are never replaced.

    Returns:
        ``top1``, ``top5``, ``mode``, ``epochs``, ``history`` (per epoch), ``settings`` (the config
        and the resolved view), ``output``, ``linear``, ``features`` / ``checkpoint``,
        ``mlflow_run_id``, ``seconds``, ...

    Raises:
        ConfigError, BackboneSourceError: bad inputs, before anything is written.
        ProbeFailed: the probe stopped early or the backbone changed during it.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown probe mode {mode!r}; choose one of {', '.join(MODES)}")
    started = time.time()
    output = output_directory(output)
    finished = read_json(output, SUMMARY)
    if resume and finished is not None and finished.get("epochs") == config.optim.epochs:
        note(
            f"{output} is already complete ({config.optim.epochs} epochs, top-1 {finished.get('top1', 0):.2f}%); "
            f"to train it longer, give --resume {output} a larger --set optim.epochs=N"
        )
        return {**finished, "already_complete": True}
    if not resume:
        _check_output_free(output, read_json(output, PROBE_INPUTS), finished, force)
    backbone = (
        backbone_source
        if isinstance(backbone_source, Backbone)
        else load_backbone(backbone_source, config.model.arch, config.model.small_image_stem)
    )
    view = resolve_view(config, backbone.provenance.get("config"))
    config_dict = to_dict(config)
    write_json(output, PROBE_INPUTS, {"backbone": backbone.source, "train": train, "val": val, "mode": mode})
    write_text(output, CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False))

    tracking_uri = config.tracking.uri or default_tracking_uri()
    local_output = Path(output) if "://" not in output else None
    metrics_path = local_output / "metrics.jsonl" if local_output is not None else None
    if metrics_path is not None and metrics_path.exists() and not resume:
        metrics_path.unlink()  # a rerun in the same directory starts a new record
    tracker = Tracker(tracking_uri, config.tracking.enabled, metrics_path)
    tracker.start(
        config.tracking.experiment, config.tracking.run_name or f"probe-{mode}", config.tracking.parent_run_id
    )
    tracker.log_params(
        {
            **flatten(config_dict),
            **_backbone_params(backbone),
            "mode": mode,
            "train": ",".join(train),
            "val": ",".join(val),
            **{f"resolved_view.{key}": value for key, value in view.__dict__.items()},
        }
    )
    note(
        f"probe ({mode}): {backbone.arch} ({backbone.kind}: {backbone.source}); {view.size} px, "
        f"crop {view.crop_fraction:g} (view settings from the {view.source}); lr {config.optim.lr:g}, "
        f"wd {config.optim.weight_decay:g}, {config.optim.epochs} epochs, batch {config.optim.batch_size}"
    )
    try:
        if mode == "cached":
            outcome = _run_cached(backbone, train, val, output, config, view, tracker)
        else:
            outcome = _run_full(backbone, train, val, output, config, view, tracker)
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = {
        "mode": mode,
        **outcome,
        "backbone": {"source": backbone.source, "kind": backbone.kind, "arch": backbone.arch},
        "settings": {**config_dict, "resolved_view": dict(view.__dict__)},
        "output": output,
        "seconds": round(time.time() - started, 1),
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracking_uri,
        "mlflow_ui": ui_command(tracking_uri),
    }
    write_json(output, SUMMARY, summary)
    if outcome.get("top1") is not None:
        tracker.log_metrics({"top1": outcome["top1"], "top5": outcome["top5"]}, config.optim.epochs)
    if local_output is not None:
        for name in (LINEAR_FILE, CONFIG_FILE, "metrics.jsonl", SUMMARY):
            tracker.log_artifact(local_output / name)
    tracker.finish("FINISHED")
    note(f"probe ({mode}): top-1 {summary['top1']:.2f}%, top-5 {summary['top5']:.2f}% on {val[0]}; output {output}")
    return summary


def _check_output_free(
    output: str, previous: dict[str, Any] | None, finished: dict[str, Any] | None, force: bool
) -> None:
    """A new probe may write into ``output`` unless it holds a full probe (whose checkpoints the new
    one would resume from) or, without ``force``, a finished probe's results.

    Raises:
        ConfigError: naming what ``output`` holds and what to do instead.
    """
    if previous is None:
        return
    if previous.get("mode") == "full" and finished is None:
        raise ConfigError(f"{output} holds an unfinished full probe; continue it with --resume {output}")
    if previous.get("mode") == "full":
        raise ConfigError(f"{output} holds a finished full probe and its checkpoints; choose a new --output")
    if finished is not None and not force:
        raise ConfigError(
            f"{output} holds a finished probe (top-1 {finished.get('top1', 0):.2f}%); choose a new --output, "
            "or pass --force to replace its results (its cached features are reused)"
        )


def _run_cached(
    backbone: Backbone,
    train: list[str],
    val: list[str],
    output: str,
    config: ProbeConfig,
    view: ProbeView,
    tracker: Tracker,
) -> dict[str, Any]:
    """Extract (or reuse) features, then train the fc layer on them in this process."""
    features = extract_cached_features(backbone, train, val, config, view, join(output, "features"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_x = torch.from_numpy(features.train.features).to(device)
    train_y = torch.from_numpy(features.train.labels).to(device)
    val_x = torch.from_numpy(features.val.features).to(device)
    val_y = torch.from_numpy(features.val.labels).to(device)
    epochs = config.optim.epochs
    report_every = max(1, epochs // 10)

    def on_epoch(record: EpochRecord) -> None:
        metrics = {"train_loss": record.train_loss, "train_top1": record.train_top1}
        if record.val is not None:
            metrics |= {"val_top1": record.val.top1, "val_top5": record.val.top5, "val_loss": record.val.loss}
        tracker.log_metrics(metrics, record.epoch + 1)
        if (record.epoch + 1) % report_every == 0 or record.epoch + 1 == epochs:
            shown = f" | val top-1 {record.val.top1:.2f}%" if record.val is not None else ""
            note(
                f"probe epoch {record.epoch + 1}/{epochs} | loss {record.train_loss:.4f} | "
                f"train top-1 {record.train_top1:.2f}%{shown}"
            )

    trained = time.time()
    result = train_linear_classifier(
        train_x,
        train_y,
        val_x,
        val_y,
        features.num_classes,
        config.linear,
        eval_every_epochs=config.training.eval_every_epochs,
        on_epoch=on_epoch,
    )
    assert result.final is not None
    linear = _write_linear(
        output, {k: v.cpu() for k, v in result.classifier.state_dict().items()}, features.class_names
    )
    history = [
        {
            "epoch": record.epoch + 1,
            "train_loss": record.train_loss,
            "train_top1": record.train_top1,
            **({"val_top1": record.val.top1, "val_top5": record.val.top5} if record.val is not None else {}),
        }
        for record in result.history
    ]
    return {
        "top1": result.final.top1,
        "top5": result.final.top5,
        "epochs": epochs,
        "history": history,
        "num_classes": features.num_classes,
        "train_images": features.train.num_images,
        "val_images": features.val.num_images,
        "skipped_images": features.skipped,
        "features": features.directory,
        "features_reused": features.reused,
        "extract_seconds": features.seconds,
        "train_seconds": round(time.time() - trained, 2),
        "linear": linear,
    }


def _run_full(
    backbone: Backbone,
    train: list[str],
    val: list[str],
    output: str,
    config: ProbeConfig,
    view: ProbeView,
    tracker: Tracker,
) -> dict[str, Any]:
    """The protocol on Ray Train workers (pipelines.evaluate.probe_worker)."""
    import ray

    from moco_core.image_io import ImageLimits
    from pipelines.evaluate.probe_worker import CHECKPOINT_FILE, PROBE_SUMMARY, ProbePlan, probe_loop_per_worker
    from pipelines.ingest.ingest_state import IngestState
    from pipelines.ingest.stream import build_view_dataset, plan_layout
    from pipelines.ingest.views import EvalViewFunction, RandomCropViewFunction
    from pipelines.ray_runtime import ensure_ray, on_this_node
    from pipelines.run_console import ConsoleRelay, RunConsole, run_watched
    from pipelines.train_jobs import build_torch_trainer, check_cluster, reader_lanes, root_cause

    train_collection = plan_labelled(train, config, "--train")
    val_collection = plan_labelled(val, config, "--val")
    class_names, mapping = label_mapping(train_collection, val_collection)
    num_classes = len(class_names) or _count_classes(train_collection, val_collection)
    fixed = ensure_ray()
    check_cluster(config.scaling, config.data.reader_resources, fixed)
    lanes = reader_lanes(config.scaling, config.data.readers, config.data.reader_resources)
    layout = plan_layout(
        train_collection,
        workers=config.scaling.workers,
        lanes_per_worker=lanes.per_worker,
        pool=config.data.shuffle_pool,
        seed=config.training.seed,
        shuffle=config.data.shuffle,
    )
    limits = ImageLimits(min_side=config.data.min_side, max_pixels=config.data.max_pixels)
    val_layout = plan_layout(val_collection, lanes_per_worker=min(layout.total_lanes, len(val_collection.units)))
    val_dataset = build_view_dataset(
        val_collection,
        EvalViewFunction(view.size, limits, crop_fraction=view.crop_fraction),
        val_layout,
        end_epoch=1,
        lane_cpus=0,  # read while training waits for it (as pretraining's kNN monitor)
    ).dataset
    num_images = train_collection.num_images or 0
    # An epoch is num_images // batch steps of a full batch: the stream runs across epoch ends.
    steps_per_epoch = max(1, num_images // config.optim.batch_size)
    plan = ProbePlan(
        backbone=ray.put((backbone.arch, backbone.small_image_stem, backbone.state_dict)),
        feature_dim=feature_dim(backbone),
        num_classes=num_classes,
        num_images=num_images,
        steps_per_epoch=steps_per_epoch,
        collection=ray.put(train_collection),
        layout=layout,
        lane_cpus=lanes.cpus,
        lane_resources=lanes.resources,
        train_view=RandomCropViewFunction(view.size, view.train_scale, limits),
        ingest_state=IngestState.options(**on_this_node()).remote(),
        mean=view.mean,
        std=view.std,
        val_label_mapping=mapping,
        run_dir=output,
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        # The workers' notes, printed here (Ray's own output is not).
        console=RunConsole.options(**on_this_node()).remote(),
    )
    trainer = build_torch_trainer(
        probe_loop_per_worker,
        {"config": to_dict(config), "plan": plan},
        config.scaling,
        output,
        config.checkpoint.keep,
        {"val": val_dataset},
    )
    note(
        f"probe (full): {num_images} training images, {config.optim.epochs} epochs of {steps_per_epoch} steps on "
        f"{config.scaling.workers} worker(s), {layout.total_lanes} reader lane(s)"
    )
    try:
        result = run_watched(trainer.fit, ConsoleRelay(plan.console))
    except Exception as error:  # noqa: BLE001 -- one line, with where to resume
        raise ProbeFailed(f"the probe failed: {root_cause(error)}; continue it with --resume {output}") from error
    outcome = read_json(output, PROBE_SUMMARY) or {}
    if outcome.get("stopped"):
        raise ProbeFailed(f"the probe stopped: {outcome['stopped']}")
    if outcome.get("sanity_check") != "passed":
        changed = ", ".join(outcome.get("changed_backbone_tensors", [])) or "unknown"
        raise ProbeFailed(
            f"sanity check failed: the frozen backbone changed during the probe (tensors: {changed}); "
            "its accuracy does not measure the pretrained weights"
        )
    if result.checkpoint is None:
        raise ProbeFailed("the probe finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    linear = _write_linear(output, saved["classifier"], class_names)
    return {
        "top1": outcome["top1"],
        "top5": outcome["top5"],
        "epochs": config.optim.epochs,
        "history": outcome["history"],
        "num_classes": num_classes,
        "train_images": num_images,
        "val_images": val_collection.num_images,
        "steps_per_epoch": steps_per_epoch,
        "images_per_s": outcome.get("images_per_s"),
        "sanity_check": outcome["sanity_check"],
        "checkpoint": result.checkpoint.path,
        "linear": linear,
    }


def _count_classes(*collections: Any) -> int:
    """Classes of collections with integer labels only: one more than the largest label seen."""
    from pipelines.ingest.sources import ReadProblems, read_unit

    largest = 0
    for collection in collections:
        for unit in range(len(collection.units)):
            for image in read_unit(collection.units, unit, collection.columns, ReadProblems()):
                largest = max(largest, image.label)
    return largest + 1


def load_probe_for_resume(output: str, overrides: list[str]) -> tuple[ProbeConfig, dict[str, Any]]:
    """The config and inputs of the full probe in ``output``, with ``overrides`` applied.

    Raises:
        ConfigError: ``output`` holds no probe.
    """
    from pipelines.config import apply_overrides

    inputs, text = read_json(output, PROBE_INPUTS), read_text(output, CONFIG_FILE)
    if inputs is None or text is None:
        raise ConfigError(f"{output} holds no probe to resume (needs {PROBE_INPUTS} and {CONFIG_FILE})")
    if inputs.get("mode") != "full":
        raise ConfigError(
            f"{output} holds a {inputs.get('mode')} probe; only a full probe resumes (a cached one reruns in "
            "seconds from its features: give --force with the same --output)"
        )
    return probe_config_from_mapping(apply_overrides(yaml.safe_load(text), overrides)), inputs
