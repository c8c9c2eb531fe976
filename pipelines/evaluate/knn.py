"""``moco knn``: the weighted kNN classifier (:mod:`moco_core.knn`) on frozen backbone features.

Features are the centre-crop features of ``moco probe --mode cached``, extracted once by Ray Data
and cached in ``OUTPUT/features`` (:mod:`pipelines.evaluate.features`); the training set is the
bank, every validation image a query.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from moco_core.knn import knn_predict
from pipelines.config import ConfigError
from pipelines.console import note
from pipelines.evaluate.backbones import Backbone, load_backbone
from pipelines.evaluate.features import extract_cached_features
from pipelines.evaluate.probe_config import ProbeConfig, resolve_view
from pipelines.filesystems import join, output_directory
from pipelines.pretrain.run_files import read_json, write_json
from pipelines.pretrain.tracking import Tracker, default_tracking_uri

SUMMARY = "knn_summary.json"


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """(top-1, top-5) percent of the weighted kNN on unit-normalised features.

    Shape:
        bank: (N, D); bank_labels: (N,); queries: (M, D); query_labels: (M,)
    """
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    correct1 = correct5 = 0
    for start in range(0, queries.shape[0], chunk_size):
        scores = knn_predict(queries[start : start + chunk_size], bank, bank_labels, num_classes, k, temperature)
        labels = query_labels[start : start + chunk_size]
        top = scores.topk(min(5, num_classes), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels.unsqueeze(1)).any(dim=1).sum())
    count = max(queries.shape[0], 1)
    return 100.0 * correct1 / count, 100.0 * correct5 / count


def run_knn(
    backbone_source: str | Backbone,
    train: list[str],
    val: list[str],
    output: str,
    config: ProbeConfig,
    k: int = 200,
    temperature: float = 0.1,
    force: bool = False,
) -> dict[str, Any]:
    """kNN top-1 / top-5 of the backbone's features: ``train`` is the bank, ``val`` the queries.

    Args:
        force: replace a ``knn_summary.json`` already in ``output`` (without it, it is refused).

    Raises:
        ConfigError, BackboneSourceError: bad inputs (one line).
    """
    if k < 1 or temperature <= 0:
        raise ConfigError(f"--k {k} / --temperature {temperature}: expected k >= 1 and temperature > 0")
    started = time.time()
    output = output_directory(output)
    if not force and read_json(output, SUMMARY) is not None:
        raise ConfigError(
            f"{output} holds a kNN result ({SUMMARY}); choose a new --output, or pass --force to replace it "
            "(its cached features are reused)"
        )
    backbone = (
        backbone_source
        if isinstance(backbone_source, Backbone)
        else load_backbone(backbone_source, config.model.arch, config.model.small_image_stem)
    )
    config = replace(config, cached=replace(config.cached, augmented_copies=0))
    view = resolve_view(config, backbone.provenance.get("config"))
    features = extract_cached_features(backbone, train, val, config, view, join(output, "features"))
    bank_size = features.train.num_images
    if k > bank_size:
        note(f"kNN: --k {k} is more than the {bank_size} bank images; using k={bank_size}")
        k = bank_size
    top1, top5 = knn_accuracy(
        torch.from_numpy(features.train.features),
        torch.from_numpy(features.train.labels),
        torch.from_numpy(features.val.features),
        torch.from_numpy(features.val.labels),
        features.num_classes,
        k,
        temperature,
    )
    tracking_uri = config.tracking.uri or default_tracking_uri()
    tracker = Tracker(tracking_uri, config.tracking.enabled)
    tracker.start(config.tracking.experiment, config.tracking.run_name or "knn", config.tracking.parent_run_id)
    tracker.log_params(
        {"backbone.source": backbone.source, "backbone.arch": backbone.arch, "k": k, "temperature": temperature}
        | {"train": ",".join(train), "val": ",".join(val), "view.size": view.size, "view.crop": view.crop_fraction}
    )
    tracker.log_metrics({"knn_top1": top1, "knn_top5": top5}, 0)
    tracker.finish("FINISHED")
    summary = {
        "top1": top1,
        "top5": top5,
        "k": k,
        "temperature": temperature,
        "num_classes": features.num_classes,
        "bank_images": features.train.num_images,
        "query_images": features.val.num_images,
        "backbone": {"source": backbone.source, "kind": backbone.kind, "arch": backbone.arch},
        "view": dict(view.__dict__),
        "features": features.directory,
        "features_reused": features.reused,
        "output": output,
        "seconds": round(time.time() - started, 1),
        "mlflow_run_id": tracker.run_id,
    }
    write_json(output, SUMMARY, summary)
    note(f"kNN (k={k}, t={temperature:g}): top-1 {top1:.2f}%, top-5 {top5:.2f}% on {features.val.num_images} images")
    return summary
