"""Load a pretrained backbone from any SOURCE a user has: the one entry point of probe, kNN and export.

SOURCE is a local path or a URI (``s3://``, ``gs://``, ``file://``; read through pyarrow) to one of:

* a ``moco pretrain`` run directory: ``latest_checkpoint.json`` names its newest complete
  checkpoint; the architecture comes from that checkpoint's ``config.yaml``;
* one checkpoint directory (``model.pt``, ``config.yaml``, ``state.json``) or its ``model.pt``;
* a ``backbone.pt`` as ``moco pretrain`` writes it (torchvision keys, no ``fc``);
* a plain torchvision state dict (``torch.save(model.state_dict(), ...)``; ``fc.*`` is dropped);
* an official MoCo checkpoint as ``main_moco.py`` saves it: ``{"epoch", "arch", "state_dict",
  "optimizer"}`` with ``module.encoder_q.*`` keys; like the official ``main_lincls.py``, the query
  encoder is taken, the prefix stripped and the head (v1 ``fc``, v2 ``fc.0``/``fc.2``) dropped.

The architecture is, in this order: the ``arch`` argument, the run's config, the official
checkpoint's ``arch``, or inferred from the weights (block type, blocks per stage, bottleneck
width and groups). ``small_image_stem`` likewise, inferred from conv1's kernel (3x3 or 7x7).
Whatever the origin, the weights are checked key by key and shape by shape against the torchvision
model before they are returned, so a wrong ``arch`` is one clear error here, not a failure later.
Every file is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import yaml

from moco_core.encoders import SUPPORTED_ARCHS, build_backbone
from pipelines.filesystems import StorageError, resolve_filesystem

KINDS: tuple[str, ...] = ("run", "checkpoint", "backbone", "torchvision", "official_moco")

POINTER_NAME = "latest_checkpoint.json"  # pipelines.pretrain.checkpoints.POINTER_NAME
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT_VERSION = 1  # pipelines.pretrain.checkpoints.FORMAT_VERSION
QUERY_BACKBONE_PREFIX = "query_encoder.backbone."
#: The query encoder's prefix in official checkpoints: DDP-wrapped (as main_moco.py saves) or not.
OFFICIAL_PREFIXES: tuple[str, ...] = ("module.encoder_q.", "encoder_q.")

_EXPECTED = (
    "a MoCo run directory, checkpoint (model.pt), backbone.pt, torchvision state dict or official MoCo checkpoint"
)
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_DEPTHS: dict[str, dict[tuple[int, ...], int]] = {
    "basic": {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34},
    "bottleneck": {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152},
}


class BackboneSourceError(ValueError):
    """A SOURCE that cannot be loaded, explained in one line naming the path and what was expected."""


@dataclass(frozen=True)
class Backbone:
    """A backbone's weights and what is known about where they came from.

    Attributes:
        arch: torchvision name, one of :data:`moco_core.encoders.SUPPORTED_ARCHS`.
        small_image_stem: 3x3 stride-1 conv1 and no max-pool (see ``moco_core.encoders.build_backbone``).
        state_dict: torchvision keys without ``fc.*``; loads strictly into :func:`build_backbone_module`.
        source: the SOURCE as given.
        kind: one of :data:`KINDS`.
        provenance: what is known: ``run_dir``, ``checkpoint``, ``file``, ``step``, ``epoch``,
            ``images_seen``, ``mlflow_run_id``, ``config`` (the resolved pretraining config as a
            dict), ``official_epoch``/``official_arch``/``official_head`` for official checkpoints, and
            ``arch_from``/``small_image_stem_from`` (``argument``, ``config``, ``official checkpoint``
            or ``weights``).
    """

    arch: str
    small_image_stem: bool
    state_dict: dict[str, torch.Tensor]
    source: str
    kind: str
    provenance: dict[str, Any]


def load_backbone(source: str, arch: str | None = None, small_image_stem: bool | None = None) -> Backbone:
    """Load the backbone in ``source`` (any form listed in the module docstring).

    Args:
        source: a local path or a URI.
        arch: the architecture, overriding the config and inference.
        small_image_stem: the stem, overriding the config and inference.

    Raises:
        BackboneSourceError (a ValueError): a missing path, an unreadable or unrecognised file, an
            unknown ``arch``, or weights that do not fit the architecture; one line naming the path.
    """
    if arch is not None and arch not in SUPPORTED_ARCHS:
        raise BackboneSourceError(f"unknown arch {arch!r}; choose one of: {', '.join(SUPPORTED_ARCHS)}")
    location = _Location.of(source)
    file_type = location.file_type()
    if file_type == pafs.FileType.NotFound:
        raise BackboneSourceError(f"{source}: no such file or directory (expected {_EXPECTED})")
    if file_type == pafs.FileType.Directory:
        found = _load_directory(location)
    else:
        found = _load_file(location)
    return _resolve(found, source, arch, small_image_stem)


def build_backbone_module(backbone: Backbone) -> torch.nn.Module:
    """The torchvision model of ``backbone.arch`` (``fc`` is ``Identity``) with the weights loaded
    strictly, in eval mode (BatchNorm statistics frozen), on the CPU.

    Raises:
        ValueError: the weights do not match the architecture's keys or shapes.

    Shape:
        module: (N, 3, H, W) -> (N, feature_dim)
    """
    module, _ = build_backbone(backbone.arch, backbone.small_image_stem)
    try:
        module.load_state_dict(backbone.state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{backbone.source}: the weights do not load into {backbone.arch}: {detail}") from None
    return module.eval()


def split_backbone_overrides(overrides: Sequence[str]) -> tuple[str | None, bool | None, list[str]]:
    """Take ``model.arch=NAME`` and ``model.small_image_stem=BOOL`` out of ``--set`` overrides.

    Returns:
        (arch or None, small_image_stem or None, the other overrides in order).

    Raises:
        ValueError: ``model.small_image_stem`` is not a boolean.
    """
    arch: str | None = None
    stem: bool | None = None
    rest: list[str] = []
    for override in overrides:
        key, _, text = override.partition("=")
        key = key.strip()
        if key == "model.arch":
            arch = text.strip()
        elif key == "model.small_image_stem":
            value = yaml.safe_load(text) if text.strip() else None
            if not isinstance(value, bool):
                raise ValueError(f"model.small_image_stem={text!r} is invalid: expected true or false")
            stem = value
        else:
            rest.append(override)
    return arch, stem, rest


# ---------------------------------------------------------------------------- where the bytes are


@dataclass(frozen=True)
class _Location:
    """A file or directory on a pyarrow filesystem, named in messages as the user wrote it."""

    filesystem: pafs.FileSystem
    path: str
    name: str

    @classmethod
    def of(cls, uri: str) -> _Location:
        try:
            filesystem, path = resolve_filesystem(uri)
        except StorageError as error:
            raise BackboneSourceError(str(error)) from None
        return cls(filesystem, path, uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, name: str) -> _Location:
        separator = "" if self.name.endswith("/") else "/"
        return _Location(self.filesystem, posixpath.join(self.path, name), f"{self.name}{separator}{name}")

    def parent(self) -> _Location:
        name = posixpath.dirname(self.name.rstrip("/")) or "."
        return _Location(self.filesystem, posixpath.dirname(self.path.rstrip("/")), name)

    def basename(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def file_type(self) -> pafs.FileType:
        try:
            return self.filesystem.get_file_info(self.path).type
        except OSError as error:
            raise BackboneSourceError(f"{self.name}: cannot be reached: {error}") from None

    def exists(self) -> bool:
        return self.file_type() != pafs.FileType.NotFound

    def read_text(self) -> str | None:
        """The file's text, or None when it does not exist."""
        if self.file_type() != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode()

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_file(self.path) as stream:
            return stream.readall()

    def torch_load(self, data: bytes | None = None) -> Any:
        """``torch.load(weights_only=True)`` on the file (or on its ``data``, already read); a
        one-line error when it is not a torch file."""
        try:
            if data is None and self.is_local:
                return torch.load(self.path, map_location="cpu", weights_only=True)
            data = self.read_bytes() if data is None else data
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- pickle, zip, EOF and unsafe-global errors all mean "not ours"
            raise BackboneSourceError(
                f"{self.name}: not readable with torch.load(weights_only=True) ({_load_failure(error)}); "
                f"expected {_EXPECTED}"
            ) from None


# ---------------------------------------------------------------------------- the SOURCE forms


@dataclass
class _Found:
    """Weights found in a SOURCE, before the architecture is settled."""

    state_dict: dict[str, torch.Tensor]
    kind: str
    provenance: dict[str, Any]
    config: dict[str, Any] | None = None
    official_arch: str | None = None


def _load_directory(location: _Location) -> _Found:
    pointer_text = location.child(POINTER_NAME).read_text()
    if pointer_text is not None:
        return _load_run(location, pointer_text)
    if location.child(MODEL_FILE).file_type() == pafs.FileType.File:
        return _load_file(location.child(MODEL_FILE))
    raise BackboneSourceError(
        f"{location.name}: a directory without {POINTER_NAME} (a moco pretrain run) or {MODEL_FILE} "
        "(a checkpoint); give a run directory, a checkpoint directory or a weights file"
    )


def _load_run(run: _Location, pointer_text: str) -> _Found:
    pointer = _json_mapping(pointer_text, run.child(POINTER_NAME))
    recorded = pointer.get("path")
    if not isinstance(recorded, str) or not recorded:
        raise BackboneSourceError(f"{run.child(POINTER_NAME).name}: no checkpoint 'path' recorded")
    checkpoint = _Location.of(recorded)
    if checkpoint.file_type() != pafs.FileType.Directory:
        # The run directory was moved or copied since: the checkpoint is in its train/ folder.
        moved = run.child("train").child(checkpoint.basename())
        if moved.file_type() != pafs.FileType.Directory:
            raise BackboneSourceError(
                f"{run.name}: {POINTER_NAME} names checkpoint {recorded}, "
                f"which exists neither there nor at {moved.name}"
            )
        checkpoint = moved
    found = _load_file(checkpoint.child(MODEL_FILE))
    if found.config is None:
        found.config = _read_config(run)
        found.provenance["config"] = found.config
    found.kind = "run"
    found.provenance = {"run_dir": run.name, **found.provenance}
    for key in ("step", "epoch", "images_seen", "mlflow_run_id"):
        if found.provenance.get(key) is None and pointer.get(key) is not None:
            found.provenance[key] = pointer[key]
    return found


def _from_checkpoint_dict(saved: Mapping[str, Any], model_file: _Location) -> _Found:
    if saved["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise BackboneSourceError(
            f"{model_file.name}: checkpoint format {saved['format_version']!r} is not {CHECKPOINT_FORMAT_VERSION} "
            "(written by another version of moco)"
        )
    model = saved["model"]
    if not isinstance(model, Mapping):
        raise BackboneSourceError(f"{model_file.name}: 'model' holds a {type(model).__name__}, not a state dict")
    state = {
        key[len(QUERY_BACKBONE_PREFIX) :]: value
        for key, value in model.items()
        if key.startswith(QUERY_BACKBONE_PREFIX)
    }
    if not state:
        raise BackboneSourceError(
            f"{model_file.name}: a moco checkpoint without {QUERY_BACKBONE_PREFIX}* weights "
            f"(found keys: {_some_keys(model)})"
        )
    directory = model_file.parent()
    config = _read_config(directory)
    provenance: dict[str, Any] = {"checkpoint": directory.name}
    state_text = directory.child(STATE_FILE).read_text()
    if state_text is not None:
        training = _json_mapping(state_text, directory.child(STATE_FILE))
        provenance.update({key: training.get(key) for key in ("step", "epoch", "images_seen", "mlflow_run_id")})
    provenance["config"] = config
    return _Found(state, "checkpoint", provenance, config=config)


def _load_file(location: _Location) -> _Found:
    return _classify(location.torch_load(_read_verified(location)), location)


def _read_verified(location: _Location) -> bytes | None:
    """The bytes of a ``moco pretrain`` checkpoint's file once they match the size and SHA-256 its
    ``state.json`` recorded when it was written; None for any other file (read as it is).

    Raises:
        BackboneSourceError: the file is damaged (truncated or altered on its storage).
    """
    from pipelines.pretrain.checkpoints import recorded_damage

    state_text = location.parent().child(STATE_FILE).read_text()
    try:
        expected = json.loads(state_text)["files"][location.basename()] if state_text else None
        expected = expected if {"bytes", "sha256"} <= set(expected or ()) else None
    except (ValueError, KeyError, TypeError):
        expected = None  # not a checkpoint record, or one from before checksums were recorded
    if expected is None:
        return None
    data = location.read_bytes()
    damage = recorded_damage(len(data), expected, lambda: hashlib.sha256(data).hexdigest())
    if damage is None:
        return data
    raise BackboneSourceError(
        f"{location.name} {damage} (a damaged checkpoint); give an older checkpoint of the run "
        "(its train/checkpoint_step* directories)"
    )


def _classify(saved: Any, location: _Location) -> _Found:
    """Tell a file's content apart: our checkpoint, an official checkpoint, or a flat state dict."""
    if not isinstance(saved, Mapping):
        raise BackboneSourceError(
            f"{location.name}: holds a {type(saved).__name__}, not a mapping; expected {_EXPECTED}"
        )
    if "format_version" in saved and "model" in saved:
        return _from_checkpoint_dict(saved, location)
    inner = saved.get("state_dict")
    if isinstance(inner, Mapping):
        for prefix in OFFICIAL_PREFIXES:
            if any(isinstance(key, str) and key.startswith(prefix) for key in inner):
                return _from_official(saved, inner, prefix, location)
    if _looks_like_resnet(saved):
        return _from_state_dict(saved, location)
    found_in = saved if not isinstance(inner, Mapping) else inner
    raise BackboneSourceError(f"{location.name}: not {_EXPECTED} (found keys: {_some_keys(found_in)})")


def _from_official(saved: Mapping[str, Any], inner: Mapping[str, Any], prefix: str, location: _Location) -> _Found:
    encoder = {key[len(prefix) :]: value for key, value in inner.items() if key.startswith(prefix)}
    head = sorted(key for key in encoder if key.startswith("fc."))
    state = {key: value for key, value in encoder.items() if not key.startswith("fc.")}
    _check_tensors(state, location)
    provenance: dict[str, Any] = {
        "file": location.name,
        "official_epoch": saved.get("epoch"),
        "official_arch": saved.get("arch"),
        "official_head": _head_name(head),
    }
    official_arch = saved.get("arch") if isinstance(saved.get("arch"), str) else None
    return _Found(state, "official_moco", provenance, official_arch=official_arch)


def _head_name(head_keys: list[str]) -> str:
    if any(key.startswith("fc.0.") for key in head_keys):
        return "mlp (v2: fc.0, fc.2)"
    if head_keys:
        return "linear (v1: fc)"
    return "none"


def _from_state_dict(saved: Mapping[str, Any], location: _Location) -> _Found:
    state = {key: value for key, value in saved.items() if not key.startswith("fc.")}
    _check_tensors(state, location)
    directory = location.parent()
    config = _read_config(directory)
    is_ours = location.basename() == "backbone.pt" or config is not None
    provenance: dict[str, Any] = {"file": location.name}
    if config is not None:
        provenance["config"] = config
        pointer_text = directory.child(POINTER_NAME).read_text()
        if pointer_text is not None:  # the backbone.pt that moco pretrain writes beside its run files
            pointer = _json_mapping(pointer_text, directory.child(POINTER_NAME))
            provenance["run_dir"] = directory.name
            provenance.update({key: pointer.get(key) for key in ("step", "epoch", "mlflow_run_id")})
    return _Found(state, "backbone" if is_ours else "torchvision", provenance, config=config)


def _looks_like_resnet(saved: Mapping[str, Any]) -> bool:
    return "conv1.weight" in saved and any(isinstance(key, str) and key.startswith("layer1.") for key in saved)


def _check_tensors(state: Mapping[str, Any], location: _Location) -> None:
    odd = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise BackboneSourceError(f"{location.name}: values that are not tensors under {', '.join(odd[:5])}")


def _read_config(directory: _Location) -> dict[str, Any] | None:
    text = directory.child(CONFIG_FILE).read_text()
    if text is None:
        return None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise BackboneSourceError(f"{directory.child(CONFIG_FILE).name}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise BackboneSourceError(f"{directory.child(CONFIG_FILE).name}: not a mapping of config sections")
    return config


def _json_mapping(text: str, location: _Location) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BackboneSourceError(f"{location.name}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BackboneSourceError(f"{location.name}: not a JSON object")
    return data


def _some_keys(mapping: Any, limit: int = 8) -> str:
    if not isinstance(mapping, Mapping):
        return f"a {type(mapping).__name__}"
    keys = [str(key) for key in mapping]
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return (", ".join(keys[:limit]) or "none") + more


# ---------------------------------------------------------------------------- the architecture


def _resolve(found: _Found, source: str, arch: str | None, small_image_stem: bool | None) -> Backbone:
    model_section = (found.config or {}).get("model") or {}
    config_arch = model_section.get("arch") if isinstance(model_section, dict) else None
    config_stem = model_section.get("small_image_stem") if isinstance(model_section, dict) else None
    if arch is not None:
        chosen_arch, arch_from = arch, "argument"
    elif isinstance(config_arch, str):
        chosen_arch, arch_from = config_arch, "config"
    elif found.official_arch is not None:
        chosen_arch, arch_from = found.official_arch, "official checkpoint"
    else:
        chosen_arch, arch_from = infer_arch(found.state_dict, source), "weights"
    if chosen_arch not in SUPPORTED_ARCHS:
        raise BackboneSourceError(
            f"{source}: arch {chosen_arch!r} (from the {arch_from}) is not supported; choose one of: "
            f"{', '.join(SUPPORTED_ARCHS)} (e.g. --set model.arch=NAME)"
        )
    if small_image_stem is not None:
        chosen_stem, stem_from = small_image_stem, "argument"
    elif isinstance(config_stem, bool):
        chosen_stem, stem_from = config_stem, "config"
    else:
        chosen_stem, stem_from = infer_small_image_stem(found.state_dict, source), "weights"
    check_fits(found.state_dict, chosen_arch, chosen_stem, source, f"from the {arch_from}")
    provenance = {**found.provenance, "arch_from": arch_from, "small_image_stem_from": stem_from}
    return Backbone(chosen_arch, chosen_stem, found.state_dict, source, found.kind, provenance)


def infer_small_image_stem(state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> bool:
    """True for a 3x3 conv1 (the small-image stem), False for torchvision's 7x7.

    Raises:
        BackboneSourceError: no 4-d ``conv1.weight``.
    """
    weight = state_dict.get("conv1.weight")
    if weight is None or weight.dim() != 4:
        raise BackboneSourceError(f"{source}: no 4-d conv1.weight, so no ResNet stem to read")
    return tuple(weight.shape[-2:]) == (3, 3)


def infer_arch(state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> str:
    """The torchvision ResNet-family name whose structure the weights have.

    BasicBlock (no ``layer1.0.conv3``) or Bottleneck; blocks per stage give the depth; the first
    bottleneck's 3x3 conv, of shape (width, width / groups, 3, 3), gives groups and width per group:
    64 per group and 1 group is a plain ResNet, 128 a Wide-ResNet-2, 32x4 / 32x8 / 64x4 a ResNeXt.

    Raises:
        BackboneSourceError: the structure is not one of :data:`moco_core.encoders.SUPPORTED_ARCHS`.
    """
    blocks = []
    for stage in _STAGES:
        indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{stage}\.(\d+)\.", key))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    block = "bottleneck" if bottleneck else "basic"
    description = f"{block} blocks per stage {blocks}"
    depth = _DEPTHS[block].get(tuple(blocks))
    name: str | None = None
    if depth is not None and not bottleneck:
        name = f"resnet{depth}"
    elif depth is not None:
        conv2 = state_dict.get("layer1.0.conv2.weight")
        if conv2 is not None and conv2.dim() == 4 and conv2.shape[1] > 0 and conv2.shape[0] % conv2.shape[1] == 0:
            width, per_group = int(conv2.shape[0]), int(conv2.shape[1])
            groups = width // per_group
            description += f", first 3x3 conv {width} wide in {groups} group(s)"
            if groups == 1 and width == 64:
                name = f"resnet{depth}"
            elif groups == 1 and width == 128:
                name = f"wide_resnet{depth}_2"
            elif groups > 1:
                name = f"resnext{depth}_{groups}x{per_group}d"
    if name is None or name not in SUPPORTED_ARCHS:
        raise BackboneSourceError(
            f"{source}: cannot infer the architecture ({description}); give it with --set model.arch=NAME, "
            f"one of: {', '.join(SUPPORTED_ARCHS)}"
        )
    return name


def check_fits(
    state_dict: Mapping[str, torch.Tensor], arch: str, small_image_stem: bool, source: str = "weights", why: str = ""
) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of torchvision ``arch`` without ``fc``.

    Raises:
        BackboneSourceError: the first few missing, unexpected and mis-shaped keys.
    """
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        reference, _ = build_backbone(arch, small_image_stem)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mis_shaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    if not (missing or unexpected or mis_shaped):
        return
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > 3 else ""
            problems.append(f"{label} {', '.join(items[:3])}{more}")
    try:
        looks_small = "small" if infer_small_image_stem(state_dict, source) else "standard"
        hint = f"; the weights look like {infer_arch(state_dict, source)} with the {looks_small} stem"
    except BackboneSourceError:
        hint = ""
    stem = "small" if small_image_stem else "standard"
    origin = f" ({why})" if why else ""
    raise BackboneSourceError(
        f"{source}: the weights do not fit {arch}{origin} with the {stem} stem: {'; '.join(problems)}{hint}"
    )


def _load_failure(error: Exception) -> str:
    """Why ``torch.load`` failed, in a few words: its first sentence, with the error's type."""
    text = " ".join(str(error).split())
    if "central directory" in text or isinstance(error, EOFError):
        return "the file ends early: truncated or damaged"
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return f"it holds {unsafe[1]} objects, which weights_only=True does not load"
    if "Unsupported operand" in text or (
        isinstance(error, (KeyError, pickle.UnpicklingError)) and "weights" not in text
    ):
        return "not a file torch.save writes"  # e.g. a text file: 'KeyError: 101', 'Unsupported operand 110'
    first = text.split(". ")[0][:160] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
