"""Every SOURCE form loads to the same torchvision-keyed backbone; a wrong one is one clear line.

The sources are written the way their producers write them: ``moco pretrain``'s checkpoints with
``pipelines.pretrain.checkpoints`` and a config from the ``demo`` recipe, a torchvision state dict
with ``torch.save``, and official MoCo checkpoints with ``main_moco.py``'s key names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from moco_core.encoders import SUPPORTED_ARCHS, build_backbone
from moco_core.model import build_model
from pipelines.evaluate.backbones import (
    BackboneSourceError,
    build_backbone_module,
    check_fits,
    infer_arch,
    infer_small_image_stem,
    load_backbone,
    split_backbone_overrides,
)
from pipelines.pretrain.checkpoints import TrainingState, save_checkpoint, write_pointer
from pipelines.pretrain.config import config_to_dict, load_config

RUN_ID = "0123456789abcdef"


def _randomise_batchnorm_statistics(module: torch.nn.Module, seed: int) -> None:
    """Running statistics differ from their init, so a test notices if they are not carried over."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        elif name.endswith("num_batches_tracked"):
            buffer.fill_(seed)


def query_backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefix = "query_encoder.backbone."
    return {k[len(prefix) :]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def write_run(root: Path, steps: tuple[int, ...] = (20, 40)) -> tuple[Path, dict[int, dict[str, torch.Tensor]], dict]:
    """A ``moco pretrain`` run directory with one checkpoint per step (different weights each),
    the pointer on the last, ``config.yaml`` and ``backbone.pt`` beside them.

    Returns:
        (run dir, the query backbone's weights by step, the config dict).
    """
    config = load_config(
        "demo", ["model.arch=resnet18", "model.small_image_stem=true", "model.queue_size=16", "model.dim=16"]
    )
    config_dict = config_to_dict(config)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    weights = {}
    for step in steps:
        torch.manual_seed(step)
        model = build_model(config.model)
        _randomise_batchnorm_statistics(model, step)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        state = TrainingState(step=step, epoch=step // 20, images_seen=step * 128, mlflow_run_id=RUN_ID)
        directory = root / "train" / f"checkpoint_step{step:09d}"
        save_checkpoint(directory, model, optimizer, state, config_dict)
        write_pointer(str(root), str(directory), state)
        weights[step] = query_backbone_state(model)
    torch.save(weights[steps[-1]], root / "backbone.pt")
    return root, weights, config_dict


def official_checkpoint(arch: str, head: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """An official ``main_moco.py`` checkpoint: DDP-wrapped query and key encoders with a v1
    (``fc``) or v2 (``fc.0``/``fc.2``) head, the queue and its pointer, epoch, arch and an SGD
    optimizer state. Returns it and the query backbone's torchvision weights."""
    torch.manual_seed(seed)
    query = torchvision.models.get_model(arch, weights=None)
    _randomise_batchnorm_statistics(query, seed + 1)
    key_encoder = torchvision.models.get_model(arch, weights=None)  # different random weights
    feature_dim = query.fc.in_features
    for encoder in (query, key_encoder):
        if head == "v2":
            encoder.fc = torch.nn.Sequential(
                torch.nn.Linear(feature_dim, feature_dim), torch.nn.ReLU(), torch.nn.Linear(feature_dim, 128)
            )
        else:
            encoder.fc = torch.nn.Linear(feature_dim, 128)
    state_dict = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state_dict.update({f"module.encoder_k.{k}": v for k, v in key_encoder.state_dict().items()})
    state_dict["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 64), dim=0)
    state_dict["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    for parameter in query.parameters():
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()  # a real momentum_buffer per parameter in the optimizer state
    saved = {"epoch": 200, "arch": arch, "state_dict": state_dict, "optimizer": optimizer.state_dict()}
    backbone = {k: v.clone() for k, v in query.state_dict().items() if not k.startswith("fc.")}
    return saved, backbone


def assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "run")


# ---------------------------------------------------------------------------- every SOURCE form


def test_a_run_directory_loads_its_newest_checkpoint(run):
    root, weights, config = run
    backbone = load_backbone(str(root))
    assert (backbone.kind, backbone.arch, backbone.small_image_stem) == ("run", "resnet18", True)
    assert_same_weights(backbone.state_dict, weights[40])
    assert not any(
        torch.equal(backbone.state_dict[k], weights[20][k]) for k in ("conv1.weight", "layer4.1.bn2.running_mean")
    )
    provenance = backbone.provenance
    assert provenance["run_dir"] == str(root) and provenance["checkpoint"].endswith("checkpoint_step000000040")
    assert (provenance["step"], provenance["epoch"], provenance["mlflow_run_id"]) == (40, 2, RUN_ID)
    assert provenance["config"] == config and provenance["arch_from"] == "config"


def test_a_moved_run_directory_still_finds_its_checkpoint(run, tmp_path):
    root, weights, _ = run
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)  # the pointer still names the original location ...
    shutil.rmtree(moved / "train" / "checkpoint_step000000020")
    original = root / "train" / "checkpoint_step000000040"
    hidden = original.with_name("hidden")
    original.rename(hidden)  # ... which is gone
    try:
        backbone = load_backbone(str(moved))
    finally:
        hidden.rename(original)
    assert backbone.provenance["checkpoint"] == str(moved / "train" / "checkpoint_step000000040")
    assert_same_weights(backbone.state_dict, weights[40])


def remote_filesystem(monkeypatch, module, root: Path) -> None:
    """``remote://X`` in ``module`` is ``root/X`` behind a filesystem that is not the local one,
    so it is read the way an object store is (bytes through pyarrow, not a local path)."""
    import pyarrow.fs as pafs

    resolve = module.resolve_filesystem

    def resolve_remote(uri: str):
        if uri.startswith("remote://"):
            return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), uri[len("remote://") :]
        return resolve(uri)

    monkeypatch.setattr(module, "resolve_filesystem", resolve_remote)


def test_a_run_directory_at_a_uri_is_read_through_pyarrow(run, tmp_path, monkeypatch):
    from pipelines.evaluate import backbones

    root, weights, config = run
    shutil.copytree(root, tmp_path / "bucket" / "run")
    pointer = tmp_path / "bucket" / "run" / "latest_checkpoint.json"
    recorded = json.loads(pointer.read_text())
    recorded["path"] = "remote://bucket/run/train/checkpoint_step000000040"
    pointer.write_text(json.dumps(recorded))
    remote_filesystem(monkeypatch, backbones, tmp_path)
    backbone = load_backbone("remote://bucket/run")
    assert (backbone.kind, backbone.arch, backbone.small_image_stem) == ("run", "resnet18", True)
    assert backbone.provenance["checkpoint"] == recorded["path"] and backbone.provenance["config"] == config
    assert_same_weights(backbone.state_dict, weights[40])
    with pytest.raises(BackboneSourceError, match="^remote://bucket/nothing: no such file or directory"):
        load_backbone("remote://bucket/nothing")


@pytest.mark.parametrize("which", ["directory", "model.pt"])
def test_one_checkpoint_loads_from_its_directory_or_its_model_file(run, which):
    root, weights, config = run
    directory = root / "train" / "checkpoint_step000000020"
    backbone = load_backbone(str(directory if which == "directory" else directory / "model.pt"))
    assert (backbone.kind, backbone.arch, backbone.small_image_stem) == ("checkpoint", "resnet18", True)
    assert_same_weights(backbone.state_dict, weights[20])
    assert (backbone.provenance["step"], backbone.provenance["mlflow_run_id"]) == (20, RUN_ID)
    assert backbone.provenance["config"] == config


def test_backbone_pt_beside_its_run_and_on_its_own(run, tmp_path):
    root, weights, config = run
    beside = load_backbone(str(root / "backbone.pt"))
    assert (beside.kind, beside.arch, beside.small_image_stem) == ("backbone", "resnet18", True)
    assert_same_weights(beside.state_dict, weights[40])
    assert beside.provenance["config"] == config and beside.provenance["step"] == 40
    assert beside.provenance["mlflow_run_id"] == RUN_ID

    shutil.copy(root / "backbone.pt", tmp_path / "backbone.pt")  # no config: inferred from the weights
    alone = load_backbone(str(tmp_path / "backbone.pt"))
    assert (alone.kind, alone.arch, alone.small_image_stem) == ("backbone", "resnet18", True)
    assert alone.provenance["arch_from"] == "weights" and alone.provenance["small_image_stem_from"] == "weights"
    assert_same_weights(alone.state_dict, weights[40])


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_a_damaged_checkpoint_is_named_not_loaded(tmp_path, damage):
    root, weights, _ = write_run(tmp_path / "run")
    model_file = root / "train" / "checkpoint_step000000040" / "model.pt"
    data = bytearray(model_file.read_bytes())
    if damage == "truncate":
        model_file.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, still a readable file
        model_file.write_bytes(bytes(data))
    reason = "has .* bytes, .* when written" if damage == "truncate" else "does not match the SHA-256 .* written"
    for source in (root, model_file.parent):
        with pytest.raises(BackboneSourceError, match=rf"model.pt {reason} \(a damaged checkpoint\)"):
            load_backbone(str(source))
    assert_same_weights(load_backbone(str(root / "train" / "checkpoint_step000000020")).state_dict, weights[20])


def test_a_torchvision_state_dict_loads_without_fc(tmp_path):
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None)
    _randomise_batchnorm_statistics(model, 3)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    backbone = load_backbone(str(tmp_path / "resnet18.pth"))
    assert (backbone.kind, backbone.arch, backbone.small_image_stem) == ("torchvision", "resnet18", False)
    assert_same_weights(backbone.state_dict, {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})


@pytest.mark.parametrize("head", ["v1", "v2"])
def test_an_official_moco_checkpoint_loads_its_query_encoder_without_the_head(tmp_path, head):
    saved, expected = official_checkpoint("resnet18", head)
    torch.save(saved, tmp_path / "checkpoint_0199.pth.tar")
    backbone = load_backbone(str(tmp_path / "checkpoint_0199.pth.tar"))
    assert (backbone.kind, backbone.arch, backbone.small_image_stem) == ("official_moco", "resnet18", False)
    assert_same_weights(backbone.state_dict, expected)  # the query encoder, not the key encoder
    assert not torch.equal(saved["state_dict"]["module.encoder_k.conv1.weight"], backbone.state_dict["conv1.weight"])
    assert backbone.provenance["official_epoch"] == 200 and backbone.provenance["arch_from"] == "official checkpoint"
    assert backbone.provenance["official_head"].startswith("mlp" if head == "v2" else "linear")


def test_an_official_checkpoint_without_arch_or_ddp_prefix_is_inferred(tmp_path):
    saved, expected = official_checkpoint("resnet18", "v2")
    del saved["arch"]
    saved["state_dict"] = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "single_gpu.pth")
    backbone = load_backbone(str(tmp_path / "single_gpu.pth"))
    assert (backbone.arch, backbone.provenance["arch_from"]) == ("resnet18", "weights")
    assert_same_weights(backbone.state_dict, expected)


def test_a_resnet50_with_the_small_stem_round_trips_through_a_file(tmp_path):
    torch.manual_seed(5)
    module, _ = build_backbone("resnet50", small_image_stem=True)
    torch.save(module.state_dict(), tmp_path / "weights.pth")
    backbone = load_backbone(str(tmp_path / "weights.pth"))
    assert (backbone.arch, backbone.small_image_stem) == ("resnet50", True)
    assert_same_weights(backbone.state_dict, module.state_dict())
    rebuilt = build_backbone_module(backbone)
    assert isinstance(rebuilt.fc, torch.nn.Identity) and not rebuilt.training
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(images), module.eval()(images))


# ---------------------------------------------------------------------------- the architecture


@pytest.mark.parametrize("small_image_stem", [False, True], ids=["7x7", "3x3"])
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_the_architecture_and_stem_are_inferred_from_the_weights(arch, small_image_stem):
    # Shapes are all inference reads: meta tensors give torchvision's exact shapes without the memory.
    with torch.device("meta"):
        module, _ = build_backbone(arch, small_image_stem)
    state = module.state_dict()
    assert infer_arch(state) == arch
    assert infer_small_image_stem(state) is small_image_stem
    check_fits(state, arch, small_image_stem)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_real_torchvision_models_are_recognised(arch):
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    assert infer_arch(state) == arch and infer_small_image_stem(state) is False


def test_the_arch_argument_wins_and_a_wrong_one_is_one_line(run):
    root, weights, _ = run
    given = load_backbone(str(root / "backbone.pt"), arch="resnet18", small_image_stem=True)
    assert given.provenance["arch_from"] == "argument" and given.provenance["small_image_stem_from"] == "argument"
    with pytest.raises(BackboneSourceError) as wrong:
        load_backbone(str(root), arch="resnet34")
    message = str(wrong.value)
    assert "\n" not in message and str(root) in message
    assert "do not fit resnet34" in message and "look like resnet18 with the small stem" in message
    with pytest.raises(BackboneSourceError, match="do not fit resnet18 .* standard stem: shape conv1.weight"):
        load_backbone(str(root), small_image_stem=False)
    with pytest.raises(BackboneSourceError, match="unknown arch 'vit_b_16'; choose one of: resnet101, "):
        load_backbone(str(root), arch="vit_b_16")


def test_build_backbone_module_refuses_weights_that_do_not_fit(run):
    root, _, _ = run
    backbone = load_backbone(str(root))
    broken = type(backbone)(backbone.arch, False, backbone.state_dict, backbone.source, backbone.kind, {})
    with pytest.raises(ValueError, match="do not load into resnet18"):
        build_backbone_module(broken)


# ---------------------------------------------------------------------------- wrong sources


def _one_line_error(source: Path) -> str:
    with pytest.raises(BackboneSourceError) as error:
        load_backbone(str(source))
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(source))
    return message


def test_wrong_sources_are_one_clear_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    assert "not readable with torch.load(weights_only=True) (not a file torch.save writes)" in _one_line_error(text)
    assert "expected a MoCo run directory, checkpoint (model.pt), backbone.pt" in _one_line_error(text)
    whole = tmp_path / "whole.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, whole)
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:4000])
    assert "(the file ends early: truncated or damaged)" in _one_line_error(tmp_path / "cut.pt")

    torch.save({"alpha": torch.zeros(2), "beta": torch.ones(3), "gamma": torch.ones(1)}, tmp_path / "random.pt")
    message = _one_line_error(tmp_path / "random.pt")
    assert "not a MoCo run directory, checkpoint (model.pt), backbone.pt, torchvision state dict or official" in message
    assert message.endswith("(found keys: alpha, beta, gamma)")

    assert "no such file or directory" in _one_line_error(tmp_path / "missing.pt")

    (tmp_path / "empty").mkdir()
    assert "without latest_checkpoint.json (a moco pretrain run) or model.pt" in _one_line_error(tmp_path / "empty")

    torch.save({"format_version": 99, "model": {}}, tmp_path / "model.pt")
    assert "checkpoint format 99 is not 1" in _one_line_error(tmp_path / "model.pt")

    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds a list, not a mapping" in _one_line_error(tmp_path / "list.pt")


def test_weights_of_an_unsupported_structure_ask_for_the_arch(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}  # 2-2-2-1 blocks
    torch.save(state, tmp_path / "odd.pth")
    message = _one_line_error(tmp_path / "odd.pth")
    assert "cannot infer the architecture (basic blocks per stage [2, 2, 2, 1])" in message
    assert "--set model.arch=NAME" in message


def test_split_backbone_overrides():
    assert split_backbone_overrides(["model.arch=resnet50", "optim.lr=30", "model.small_image_stem=true"]) == (
        "resnet50",
        True,
        ["optim.lr=30"],
    )
    assert split_backbone_overrides([]) == (None, None, [])
    with pytest.raises(ValueError, match="model.small_image_stem='maybe' is invalid"):
        split_backbone_overrides(["model.small_image_stem=maybe"])
