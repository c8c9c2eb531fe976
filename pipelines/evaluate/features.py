"""Frozen-backbone features of a labelled train / val pair, extracted once with Ray Data and cached.

``extract_cached_features`` reads both collections with the same reader lanes as pretraining
(:func:`pipelines.ingest.stream.build_view_dataset`, storage order, one pass), turns every image
into its evaluation view (centre crop), plus ``cached.augmented_copies`` training views per training
image, and runs the backbone over them in Ray Data ``map_batches`` actors (one per GPU, else one
using the CPUs the readers leave). All of these passes are one Ray Data execution, so the actors
start (a process, torch, the weights) once per extraction. The features land in ``CACHE/<key>/``
as ``.npy`` files with a ``meta.json``; ``key`` hashes the weights, the data, the views and the
columns, so the same backbone and data reuse the cache and anything else gets its own.

Features are held in the driver's memory while extracted (N x D x 4 bytes; 1.28M ImageNet images
at D=2048 are 10 GiB).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from moco_core.image_io import ImageLimits
from pipelines.config import ConfigError
from pipelines.console import note
from pipelines.evaluate.backbones import Backbone
from pipelines.evaluate.probe_config import ProbeConfig, ProbeView
from pipelines.filesystems import join, resolve_filesystem
from pipelines.ingest.planning import DataSourceError, plan_collection
from pipelines.ingest.sources import check_decodable
from pipelines.ingest.units import Collection, ColumnNames

META = "meta.json"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class FeatureSet:
    """Features and labels of one collection.

    Shape:
        features: (N, D) float32, or (copies, N, D) when augmented copies were extracted (copy 0
        is the centre crop); labels: (N,) int64
    """

    features: np.ndarray
    labels: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class CachedFeatures:
    """Both feature sets and where they are cached.

    Attributes:
        train, val: the feature sets.
        class_names: label i is ``class_names[i]`` (empty when the data gives only integer labels).
        num_classes: classes of the classifier.
        directory: the cache directory (``CACHE/<key>``).
        reused: the cache held them already.
        seconds: time spent extracting (0 when reused).
        skipped: images that could not be decoded, per split.
    """

    train: FeatureSet
    val: FeatureSet
    class_names: tuple[str, ...]
    num_classes: int
    directory: str
    reused: bool
    seconds: float
    skipped: dict[str, int]


def plan_labelled(paths: list[str], config: ProbeConfig, role: str) -> Collection:
    """A labelled, decodable collection of known size, or ConfigError naming ``role``."""
    data = config.data
    try:
        collection = plan_collection(
            paths, data.layout, ColumnNames(data.image_column, data.label_column, data.key_column)
        )
    except DataSourceError as error:
        raise ConfigError(f"{role}: {error}") from None
    check_decodable(collection)
    if not collection.labelled:
        raise ConfigError(f"{role}: no labels found (class folders, a label column or .cls files): a probe needs them")
    if collection.num_images is None:
        raise ConfigError(f"{role}: the size of a WebDataset collection is unknown; build shards with 'moco shard'")
    return collection


def require_labels(labels: np.ndarray, role: str) -> None:
    """Raise ConfigError when images of ``role`` have no label (-1: images beside the class folders,
    or shards of an unlabelled source): a probe or kNN would train or score on it."""
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ConfigError(
            f"{role}: {unlabelled} of {len(labels)} images have no label (images outside class folders, or "
            "shards of an unlabelled source); a probe and kNN need every image labelled"
        )


def label_mapping(train: Collection, val: Collection) -> tuple[tuple[str, ...], np.ndarray | None]:
    """(class names, val label -> train label) when both name their classes, else (names, None).

    Raises:
        ConfigError: the validation data has classes the training data does not.
    """
    if not train.class_names or not val.class_names or train.class_names == val.class_names:
        return train.class_names or val.class_names, None
    position = {name: index for index, name in enumerate(train.class_names)}
    unknown = [name for name in val.class_names if name not in position]
    if unknown:
        raise ConfigError(f"--val has classes the training data lacks: {', '.join(unknown[:5])}")
    return train.class_names, np.array([position[name] for name in val.class_names], dtype=np.int64)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights (names, shapes, dtypes and bytes, in key order)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(backbone: Backbone, train: Collection, val: Collection, config: ProbeConfig, view: ProbeView) -> str:
    """A short hash of everything the features depend on."""
    identity = {
        "format": CACHE_FORMAT,
        "weights": weights_digest(backbone.state_dict),
        "arch": backbone.arch,
        "small_image_stem": backbone.small_image_stem,
        "train": [list(train.sources), train.num_images, len(train.units)],
        "val": [list(val.sources), val.num_images, len(val.units)],
        "columns": asdict(config.data),
        "view": asdict(view) | {"source": None},
        "copies": config.cached.augmented_copies,
        "seed": config.training.seed,
        "precision": config.training.precision,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- the cache files


def _save_array(directory: str, name: str, array: np.ndarray) -> None:
    filesystem, base = resolve_filesystem(directory)
    buffer = io.BytesIO()
    np.save(buffer, array)
    with filesystem.open_output_stream(posixpath.join(base, name)) as stream:
        stream.write(buffer.getvalue())


def _load_array(directory: str, name: str) -> np.ndarray:
    filesystem, base = resolve_filesystem(directory)
    with filesystem.open_input_stream(posixpath.join(base, name)) as stream:
        return np.load(io.BytesIO(stream.read()), allow_pickle=False)


def _read_meta(directory: str) -> dict[str, Any] | None:
    filesystem, base = resolve_filesystem(directory)
    path = posixpath.join(base, META)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except ValueError:
        return None  # a damaged meta.json: extract again


def _write_cache(directory: str, features: CachedFeatures, meta: dict[str, Any]) -> None:
    """Arrays first, ``meta.json`` last (written through a rename): a cache without it is ignored."""
    filesystem, base = resolve_filesystem(directory)
    filesystem.create_dir(base, recursive=True)
    for split, feature_set in (("train", features.train), ("val", features.val)):
        _save_array(directory, f"{split}_features.npy", feature_set.features)
        _save_array(directory, f"{split}_labels.npy", feature_set.labels)
    temporary = posixpath.join(base, f".{META}.tmp")
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(json.dumps(meta, indent=2).encode())
    filesystem.move(temporary, posixpath.join(base, META))


def _load_cache(directory: str, meta: dict[str, Any]) -> CachedFeatures:
    sets = {
        split: FeatureSet(
            _load_array(directory, f"{split}_features.npy"), _load_array(directory, f"{split}_labels.npy")
        )
        for split in ("train", "val")
    }
    return CachedFeatures(
        sets["train"],
        sets["val"],
        tuple(meta["class_names"]),
        int(meta["num_classes"]),
        directory,
        reused=True,
        seconds=0.0,
        skipped=meta.get("skipped", {}),
    )


# ------------------------------------------------------------------------------- extraction


class BackboneFeatures:
    """Ray Data actor: uint8 view batches -> pooled backbone features (the frozen backbone in eval mode).

    Args:
        shared: ``[object ref of (arch, small_image_stem, state_dict)]``.
        mean, std: input normalisation.
        precision: ``auto`` (bf16 autocast on a GPU), ``bf16`` or ``fp32``.
        threads: torch threads on a CPU.
    """

    def __init__(self, shared: list, mean: tuple[float, ...], std: tuple[float, ...], precision: str, threads: int):
        import ray

        from moco_core.encoders import build_backbone

        arch, small_image_stem, state_dict = ray.get(shared[0])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        module, _ = build_backbone(arch, small_image_stem)
        module.load_state_dict(state_dict, strict=True)
        self.module = module.eval().to(self.device)
        self.mean, self.std = mean, std
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if use_bf16 else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from moco_core.photometric import normalize_batch

        images = normalize_batch(torch.from_numpy(batch["image"]).to(self.device), self.mean, self.std)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            features = self.module(images)
        rest = {name: values for name, values in batch.items() if name != "image"}  # labels, positions, ...
        return {"features": features.float().cpu().numpy(), **rest}


def _extraction_resources(config: ProbeConfig) -> tuple[int, float, int, float, int]:
    """(extractor actors, CPUs per actor, GPUs per actor, CPUs per reader lane, lanes)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), int(resources.get("GPU", 0))
    if gpus:
        actors = config.cached.extractors or gpus
        lanes = max(1, int(cpus) - actors)
        return actors, 1.0, 1, 1.0, lanes
    actors = config.cached.extractors or 1
    lanes = max(1, int(cpus) // 8)
    lane_cpus = 0.5 if cpus <= 2 else 1.0
    actor_cpus = max(1.0, (cpus - lanes * lane_cpus) / actors)
    return actors, actor_cpus, 0, lane_cpus, lanes


@dataclass(frozen=True)
class _Pass:
    """One stream of views to extract: ``epochs`` passes of ``view_function`` over ``collection``."""

    collection: Collection
    view_function: Any
    epochs: int = 1


@dataclass(frozen=True)
class _Extracted:
    """Features of every decodable image of a pass, sorted by (epoch, dataset index, position)."""

    features: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    epoch: np.ndarray
    epochs: int


def _tag_pass(batch: dict[str, np.ndarray], extraction: int) -> dict[str, np.ndarray]:
    """Ray Data map: the pass a row belongs to, as an ``extraction`` column."""
    return {**batch, "extraction": np.full(len(batch["label"]), extraction, dtype=np.int64)}


def _run_extraction(passes: list[_Pass], config: ProbeConfig, view: ProbeView, shared: Any) -> list[_Extracted]:
    """Every pass's features, in one Ray Data execution: the passes' reader lanes feed one pool
    of backbone actors, whose start-up (a process, torch, the weights) is paid once."""
    import ray

    from pipelines.ingest.stream import build_view_dataset, plan_layout

    actors, actor_cpus, actor_gpus, lane_cpus, lanes = _extraction_resources(config)
    tagged = []
    for number, extraction in enumerate(passes):
        collection = extraction.collection
        layout = plan_layout(
            collection, lanes_per_worker=min(lanes, len(collection.units)), seed=config.training.seed, shuffle=False
        )
        stream = build_view_dataset(
            collection,
            extraction.view_function,
            layout,
            end_epoch=extraction.epochs,
            lane_cpus=lane_cpus,
            lane_resources=config.data.reader_resources,
        )
        # No CPU of its own: a column added to each block must not wait behind the lanes and actors.
        tagged.append(stream.dataset.map_batches(_tag_pass, fn_kwargs={"extraction": number}, num_cpus=0))
    features = (
        tagged[0]
        .union(*tagged[1:])
        .map_batches(
            BackboneFeatures,
            fn_constructor_kwargs={
                "shared": [shared],
                "mean": view.mean,
                "std": view.std,
                "precision": config.training.precision,
                "threads": math.ceil(actor_cpus),
            },
            batch_size=config.cached.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            num_gpus=actor_gpus,
        )
    )
    names = ("features", "label", "index", "epoch", "position", "extraction")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    expected = sum((extraction.collection.num_images or 0) * extraction.epochs for extraction in passes)
    done, last_note = 0, time.monotonic()
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        for name in names:
            parts[name].append(batch[name])
        done += len(batch["label"])
        if time.monotonic() - last_note > 30:
            note(f"  features: {done}/{expected} images")
            last_note = time.monotonic()
    joined = {name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()}
    results = []
    for number in range(len(passes)):
        rows = np.flatnonzero(joined["extraction"] == number)
        if not len(rows):
            raise ConfigError("no image could be decoded for feature extraction")
        rows = rows[np.lexsort((joined["position"][rows], joined["index"][rows], joined["epoch"][rows]))]
        results.append(
            _Extracted(
                joined["features"][rows],
                joined["label"][rows],
                joined["index"][rows],
                joined["epoch"][rows],
                passes[number].epochs,
            )
        )
    return results


def _feature_set(
    centre: _Extracted, copies: _Extracted | None, mapping: np.ndarray | None, num_images: int
) -> tuple[FeatureSet, int]:
    """A split's feature set (centre crops, stacked with the augmented copies of the images that
    have all of them) and the count of images left out."""
    labels = centre.labels if mapping is None else mapping[centre.labels]
    if copies is None:
        return FeatureSet(centre.features, labels), num_images - len(labels)
    keep = np.ones(len(centre.index), dtype=bool)
    rows_of_copy = []
    for copy in range(copies.epochs):  # epoch e is copy e + 1
        rows = np.flatnonzero(copies.epoch == copy)
        row_of = dict(zip(copies.index[rows].tolist(), rows.tolist()))
        keep &= np.array([image in row_of for image in centre.index.tolist()], dtype=bool)
        rows_of_copy.append(row_of)
    kept = centre.index[keep].tolist()
    stacked = [centre.features[keep]] + [copies.features[[row_of[image] for image in kept]] for row_of in rows_of_copy]
    return FeatureSet(np.stack(stacked), labels[keep]), num_images - len(kept)


def _extract_splits(
    train: Collection, val: Collection, config: ProbeConfig, view: ProbeView, shared: Any, mapping: np.ndarray | None
) -> tuple[FeatureSet, int, FeatureSet, int]:
    """The train and val feature sets (centre crops, plus ``cached.augmented_copies`` training views
    per training image) and their skipped counts."""
    from pipelines.ingest.views import EvalViewFunction, RandomCropViewFunction

    limits = ImageLimits(min_side=config.data.min_side, max_pixels=config.data.max_pixels)
    centre = EvalViewFunction(view.size, limits, crop_fraction=view.crop_fraction)
    copies = config.cached.augmented_copies
    passes = [_Pass(train, centre), _Pass(val, centre)]
    if copies:
        if not train.indexed:
            raise ConfigError("cached.augmented_copies needs indexed data (shards written by 'moco shard', or Parquet)")
        passes.append(_Pass(train, RandomCropViewFunction(view.size, view.train_scale, limits), copies))
    extracted = _run_extraction(passes, config, view, shared)
    require_labels(extracted[0].labels, "--train")
    require_labels(extracted[1].labels, "--val")
    train_set, train_skipped = _feature_set(extracted[0], extracted[2] if copies else None, None, train.num_images or 0)
    val_set, val_skipped = _feature_set(extracted[1], None, mapping, val.num_images or 0)
    return train_set, train_skipped, val_set, val_skipped


def extract_cached_features(
    backbone: Backbone, train_paths: list[str], val_paths: list[str], config: ProbeConfig, view: ProbeView, cache: str
) -> CachedFeatures:
    """Features of the train and val collections under ``backbone``, from ``cache`` when there.

    Args:
        backbone: the loaded backbone.
        train_paths, val_paths: labelled collections (paths, globs or URIs).
        config: the probe config (data columns, ``cached.*``, seed, precision).
        view: the resolved image settings.
        cache: the directory (local path or URI) holding one sub-directory per key.

    Raises:
        ConfigError: unlabelled data, no decodable image, val classes unknown to train.
    """
    import ray

    from pipelines.ray_runtime import ensure_ray, release_finished_datasets

    train = plan_labelled(train_paths, config, "--train")
    val = plan_labelled(val_paths, config, "--val")
    class_names, mapping = label_mapping(train, val)
    key = cache_key(backbone, train, val, config, view)
    directory = join(cache, key)
    meta = _read_meta(directory)
    if meta is not None and meta.get("format") == CACHE_FORMAT:
        note(f"features: reusing {directory}")
        return _load_cache(directory, meta)
    ensure_ray()
    started = time.time()
    copies = config.cached.augmented_copies
    note(
        f"features: extracting {train.num_images} training and {val.num_images} validation images at "
        f"{view.size} px" + (f", plus {copies} augmented copies of each training image" if copies else "")
    )
    shared = ray.put((backbone.arch, backbone.small_image_stem, backbone.state_dict))
    train_set, train_skipped, val_set, val_skipped = _extract_splits(train, val, config, view, shared, mapping)
    del shared
    release_finished_datasets()
    num_classes = len(class_names) or int(max(train_set.labels.max(), val_set.labels.max())) + 1
    result = CachedFeatures(
        train_set,
        val_set,
        class_names,
        num_classes,
        directory,
        reused=False,
        seconds=round(time.time() - started, 1),
        skipped={"train": train_skipped, "val": val_skipped},
    )
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "class_names": list(class_names),
        "num_classes": num_classes,
        "train": {"paths": train_paths, "images": train_set.num_images, "shape": list(train_set.features.shape)},
        "val": {"paths": val_paths, "images": val_set.num_images, "shape": list(val_set.features.shape)},
        "backbone": {"source": backbone.source, "arch": backbone.arch, "small_image_stem": backbone.small_image_stem},
        "view": asdict(view),
        "augmented_copies": config.cached.augmented_copies,
        "skipped": result.skipped,
        "seconds": result.seconds,
    }
    _write_cache(directory, result, meta)
    note(f"features: {result.seconds:.0f} s, cached in {directory}")
    return result
