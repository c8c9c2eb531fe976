"""Export a loaded backbone for torchvision or detectron2, with a provenance sidecar.

Formats:

* ``torchvision``: the backbone's state dict with torchvision keys and without ``fc``, saved with
  ``torch.save``. ``torchvision.models.<arch>().load_state_dict(sd, strict=False)`` reports exactly
  ``fc.weight`` and ``fc.bias`` missing and nothing unexpected; the tensors are the source's,
  bit for bit. A small-image-stem backbone has a 3x3 conv1 and no max-pool: replace
  ``model.conv1`` and ``model.maxpool`` before loading (see :func:`loading_instructions`).
* ``detectron2``: what the official ``detection/convert-pretrain-to-detectron2.py`` writes: keys
  renamed to detectron2's ResNet names (:func:`detectron2_key`), values as numpy arrays, pickled as
  ``{"model": ..., "__author__": "MOCO", "matching_heuristics": True}``. The official script also
  carries the projection head over (as ``stem.fc.*``, which detectron2 then reports as unused);
  the export leaves it out, like every other consumer of the backbone.

Every exported FILE gets ``FILE.json`` beside it: source, kind, architecture, stem, MLflow run id,
step, pretraining config when known, format, date and the file's SHA-256. Both are written through
a temporary name and a rename; an existing FILE is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import time
from typing import Any

import pyarrow.fs as pafs
import torch

from moco_core import __version__
from moco_core.augment import IMAGENET_MEAN, IMAGENET_STD
from pipelines.evaluate.backbones import Backbone
from pipelines.filesystems import resolve_filesystem

FORMATS: tuple[str, ...] = ("torchvision", "detectron2")
SIDECAR_SUFFIX = ".json"
DETECTRON2_AUTHOR = "MOCO"

#: detectron2 settings for a backbone trained on RGB input, as the official
#: ``detection/configs/*_moco.yaml`` set them: the stride in the 3x3 conv (mean/std: below).
DETECTRON2_INPUT_CONFIG: dict[str, str] = {"MODEL.RESNETS.STRIDE_IN_1X1": "False", "INPUT.FORMAT": "RGB"}


def detectron2_pixel_statistics(backbone: Backbone) -> dict[str, str]:
    """``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` (0-255 RGB) of the input the backbone was pretrained on:
    its run's ``augment.mean`` / ``std`` (CIFAR's for a ``cifar-v2`` run), else ImageNet's."""
    augment = (backbone.provenance.get("config") or {}).get("augment") or {}
    mean, std = augment.get("mean") or IMAGENET_MEAN, augment.get("std") or IMAGENET_STD
    statistics = {"MODEL.PIXEL_MEAN": mean, "MODEL.PIXEL_STD": std}
    return {key: "[" + ", ".join(f"{255 * value:.3f}" for value in values) + "]" for key, values in statistics.items()}


class OutputExists(ValueError):
    """The export's output file is already there and ``force`` was not given."""


def torchvision_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone's weights for ``torchvision.models.<arch>()``, without ``fc``.

    Each tensor is copied into its own storage, so ``torch.save`` writes just these weights (a
    view of a larger checkpoint tensor would otherwise save all of it).
    """
    return {key: value.detach().clone() for key, value in backbone.state_dict.items() if not key.startswith("fc.")}


def detectron2_key(key: str) -> str:
    """A torchvision ResNet key renamed as the official converter does.

    Keys outside the stages get ``stem.``; ``layer1..4`` become ``res2..5``; ``bn1..3`` become
    ``conv1..3.norm``; ``downsample.0``/``downsample.1`` become ``shortcut``/``shortcut.norm``.
    E.g. ``bn1.weight`` -> ``stem.conv1.norm.weight``, ``layer3.0.downsample.1.running_mean`` ->
    ``res4.0.shortcut.norm.running_mean``.
    """
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        key = key.replace(f"bn{index}", f"conv{index}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(backbone: Backbone) -> dict[str, Any]:
    """``{"model": {detectron2 key: numpy array}, "__author__": "MOCO", "matching_heuristics": True}``."""
    model = {
        detectron2_key(key): value.detach().cpu().numpy().copy()
        for key, value in backbone.state_dict.items()
        if not key.startswith("fc.")
    }
    return {"model": model, "__author__": DETECTRON2_AUTHOR, "matching_heuristics": True}


def serialize(backbone: Backbone, file_format: str) -> bytes:
    """The exported file's bytes in ``file_format`` (one of :data:`FORMATS`)."""
    if file_format == "torchvision":
        buffer = io.BytesIO()
        torch.save(torchvision_state_dict(backbone), buffer)
        return buffer.getvalue()
    if file_format == "detectron2":
        return pickle.dumps(detectron2_checkpoint(backbone))
    raise ValueError(f"unknown export format {file_format!r}; choose one of: {', '.join(FORMATS)}")


def sidecar_path(output: str) -> str:
    """``FILE.json`` for ``FILE``."""
    return output + SIDECAR_SUFFIX


def loading_instructions(backbone: Backbone, file_format: str, output: str) -> list[str]:
    """How to load the exported file, one step per line (written into the sidecar)."""
    name = os.path.basename(output.rstrip("/")) or output
    if file_format == "torchvision":
        steps = [
            f"model = torchvision.models.{backbone.arch}()",
            f"state = torch.load('{name}', weights_only=True)",
        ]
        if backbone.small_image_stem:
            steps.append(
                "model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, "
                "bias=False); model.maxpool = torch.nn.Identity()  # small-image stem: 3x3 conv1, no max-pool"
            )
        steps.append("print(model.load_state_dict(state, strict=False))  # missing exactly fc.weight, fc.bias")
        return steps
    settings = {
        "MODEL.WEIGHTS": name,
        **detectron2_pixel_statistics(backbone),
        **DETECTRON2_INPUT_CONFIG,
        **detectron2_resnet_config(backbone.arch),
    }
    steps = [f"detectron2 config: {key} {value}" for key, value in settings.items()]
    if backbone.small_image_stem:
        steps.append(
            "the stem is 3x3 stride 1 without max-pool; detectron2's BasicStem is 7x7 stride 2 with max-pool, so "
            "stem.conv1.weight does not fit it (detectron2 skips it) unless the stem is replaced"
        )
    return steps


def detectron2_resnet_config(arch: str) -> dict[str, str]:
    """detectron2's ``MODEL.RESNETS`` settings that build the same network as torchvision ``arch``.

    detectron2's bottleneck width at res2 is NUM_GROUPS x WIDTH_PER_GROUP, torchvision's is
    groups x width per group too (64 for ResNet, 128 for Wide-ResNet-2, 32x4 for ResNeXt-50 32x4d).
    """
    match = re.fullmatch(r"(resnet|wide_resnet|resnext)(\d+)(?:_(\d+)x(\d+)d|_2)?", arch)
    if match is None:
        return {}
    family, depth = match.group(1), int(match.group(2))
    settings = {"MODEL.RESNETS.DEPTH": str(depth)}
    if depth in (18, 34):
        settings["MODEL.RESNETS.RES2_OUT_CHANNELS"] = "64"
    elif family == "wide_resnet":
        settings["MODEL.RESNETS.WIDTH_PER_GROUP"] = "128"
    elif family == "resnext":
        settings["MODEL.RESNETS.NUM_GROUPS"] = match.group(3)
        settings["MODEL.RESNETS.WIDTH_PER_GROUP"] = match.group(4)
    return settings


def sidecar_record(backbone: Backbone, file_format: str, output: str, digest: str) -> dict[str, Any]:
    """Provenance of an exported file: what it is, where it came from, how to load it."""
    provenance = dict(backbone.provenance)
    config = provenance.pop("config", None)
    return {
        "file": output,
        "format": file_format,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sha256": digest,
        "source": backbone.source,
        "kind": backbone.kind,
        "arch": backbone.arch,
        "small_image_stem": backbone.small_image_stem,
        "conv1_kernel": 3 if backbone.small_image_stem else 7,
        "mlflow_run_id": provenance.get("mlflow_run_id"),
        "step": provenance.get("step"),
        "epoch": provenance.get("epoch"),
        "num_tensors": len(backbone.state_dict),
        "provenance": provenance,
        "config": config,
        "how_to_load": loading_instructions(backbone, file_format, output),
        "exported_by": f"moco {__version__}",
    }


def export_backbone(backbone: Backbone, file_format: str, output: str, force: bool = False) -> dict[str, Any]:
    """Write ``backbone`` to ``output`` in ``file_format`` and its sidecar to ``output + ".json"``.

    Args:
        backbone: from :func:`pipelines.evaluate.backbones.load_backbone`.
        file_format: ``torchvision`` or ``detectron2``.
        output: a local path or a URI; parent directories are created.
        force: overwrite an existing ``output``.

    Returns:
        ``output``, ``sidecar``, ``format``, ``arch``, ``small_image_stem``, ``kind``, ``source``,
        ``mlflow_run_id``, ``step``, ``num_tensors``, ``sha256``.

    Raises:
        OutputExists: ``output`` exists and ``force`` is false.
        ValueError: an unknown format.
    """
    if file_format not in FORMATS:
        raise ValueError(f"unknown export format {file_format!r}; choose one of: {', '.join(FORMATS)}")
    check_output_free(output, force)
    data = serialize(backbone, file_format)
    digest = hashlib.sha256(data).hexdigest()
    write_atomically(output, data)
    record = sidecar_record(backbone, file_format, output, digest)
    write_atomically(sidecar_path(output), (json.dumps(record, indent=2, default=str) + "\n").encode())
    return {
        "output": output,
        "sidecar": sidecar_path(output),
        "format": file_format,
        "arch": backbone.arch,
        "small_image_stem": backbone.small_image_stem,
        "kind": backbone.kind,
        "source": backbone.source,
        "mlflow_run_id": record["mlflow_run_id"],
        "step": record["step"],
        "num_tensors": record["num_tensors"],
        "sha256": digest,
    }


def check_output_free(output: str, force: bool) -> None:
    """Raise :class:`OutputExists` when ``output`` or its sidecar is there and ``force`` is false;
    refuse a directory (or no name at all)."""
    if not output:
        raise ValueError("--output is empty; give a file name, e.g. backbone.pth")
    filesystem, path = resolve_filesystem(output)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        raise ValueError(f"{output} is a directory; give a file name, e.g. {posixpath.join(output, 'backbone.pth')}")
    if force:
        return
    for existing in (output, sidecar_path(output)):
        if filesystem.get_file_info(resolve_filesystem(existing)[1]).type != pafs.FileType.NotFound:
            raise OutputExists(
                f"--output {output}: {existing} already exists; choose another file or pass --force to overwrite it"
            )


def write_atomically(output: str, data: bytes) -> None:
    """Write ``data`` to ``output`` through a temporary file beside it and a rename."""
    filesystem, path = resolve_filesystem(output)
    directory, name = posixpath.split(path)
    if directory:
        filesystem.create_dir(directory, recursive=True)
    temporary = posixpath.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)
    except BaseException:
        try:
            filesystem.delete_file(temporary)
        except OSError:
            pass
        raise
