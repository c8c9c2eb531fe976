"""``moco export``: torchvision weights that load strictly apart from fc, the official detectron2
conversion, a provenance sidecar, and no silent overwrite."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipelines import cli
from pipelines.evaluate.backbones import load_backbone
from pipelines.evaluate.export import OutputExists, detectron2_key, detectron2_resnet_config, export_backbone
from tests.pipelines.test_backbones import RUN_ID, official_checkpoint, remote_filesystem, write_run

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "run", steps=(40,))


def _official_converter_names_resnet50() -> list[str]:
    """detectron2 names of a ResNet-50 by the official convert-pretrain-to-detectron2.py rules,
    spelled out block by block in torchvision's state-dict order: the stem's conv1 and bn1 under
    ``stem.`` (bn1 -> conv1.norm); layer1..4 -> res2..5; bnK -> convK.norm; downsample.0/1 ->
    shortcut / shortcut.norm."""
    names = ["stem.conv1.weight", *(f"stem.conv1.norm.{p}" for p in BN)]
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        for block in range(blocks):
            for conv in (1, 2, 3):
                names += [
                    f"res{stage}.{block}.conv{conv}.weight",
                    *(f"res{stage}.{block}.conv{conv}.norm.{p}" for p in BN),
                ]
            if block == 0:
                names += [f"res{stage}.0.shortcut.weight", *(f"res{stage}.0.shortcut.norm.{p}" for p in BN)]
    return names


def _official_converter(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The official script's loop, as a reference: every module.encoder_q.* key, head included."""
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith("module.encoder_q."):
            continue
        key = key.replace("module.encoder_q.", "")
        if "layer" not in key:
            key = "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        converted[key] = value.numpy()
    return converted


def test_torchvision_export_loads_into_stock_torchvision_apart_from_fc(tmp_path):
    torch.manual_seed(11)
    source = torchvision.models.resnet50(weights=None)
    torch.save(source.state_dict(), tmp_path / "supervised.pth")
    backbone = load_backbone(str(tmp_path / "supervised.pth"))
    output = tmp_path / "export" / "resnet50.pth"
    export_backbone(backbone, "torchvision", str(output))

    exported = torch.load(output, weights_only=True)
    model = torchvision.models.resnet50(weights=None)
    report = model.load_state_dict(exported, strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source.state_dict()[key]), key


def test_a_small_stem_export_loads_after_the_stem_is_replaced_as_the_sidecar_says(run, tmp_path):
    root, weights, _ = run
    output = tmp_path / "small.pth"
    export_backbone(load_backbone(str(root)), "torchvision", str(output))
    sidecar = json.loads(Path(f"{output}.json").read_text())
    assert sidecar["small_image_stem"] is True and sidecar["conv1_kernel"] == 3
    assert any("model.maxpool = torch.nn.Identity()" in step for step in sidecar["how_to_load"])

    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError, match="conv1.weight"):
        model.load_state_dict(torch.load(output, weights_only=True), strict=False)
    model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    report = model.load_state_dict(torch.load(output, weights_only=True), strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    for key, value in weights[40].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_detectron2_export_is_the_official_conversion_of_a_resnet50(tmp_path):
    saved, expected = official_checkpoint("resnet50", "v2", seed=7)
    del saved["optimizer"]  # keep the file small; the optimizer is covered by the loader's tests
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if not k.startswith("module.encoder_k.")}
    torch.save(saved, tmp_path / "moco_v2_800ep.pth.tar")
    output = tmp_path / "moco_v2_800ep.pkl"
    export_backbone(load_backbone(str(tmp_path / "moco_v2_800ep.pth.tar")), "detectron2", str(output))

    with open(output, "rb") as stream:
        converted = pickle.load(stream)
    assert set(converted) == {"model", "__author__", "matching_heuristics"}
    assert converted["__author__"] == "MOCO" and converted["matching_heuristics"] is True
    model = converted["model"]
    names = _official_converter_names_resnet50()
    assert list(model) == names and len(names) == len(expected) == 318
    for (source_key, source_value), name in zip(expected.items(), names):  # both in torchvision's order
        assert isinstance(model[name], np.ndarray) and model[name].dtype == source_value.numpy().dtype
        assert np.array_equal(model[name], source_value.numpy()), (source_key, name)

    # The official script on the same file gives the same arrays, plus the projection head we leave out.
    official = _official_converter(saved["state_dict"])
    assert sorted(set(official) - set(model)) == [
        "stem.fc.0.bias",
        "stem.fc.0.weight",
        "stem.fc.2.bias",
        "stem.fc.2.weight",
    ]
    assert all(np.array_equal(official[name], model[name]) for name in model)


@pytest.mark.parametrize(
    ("torchvision_key", "detectron2"),
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.bn3.weight", "res2.0.conv3.norm.weight"),
        ("layer3.0.downsample.0.weight", "res4.0.shortcut.weight"),
        ("layer4.0.downsample.1.num_batches_tracked", "res5.0.shortcut.norm.num_batches_tracked"),
        ("layer2.3.conv2.weight", "res3.3.conv2.weight"),
    ],
)
def test_detectron2_names(torchvision_key, detectron2):
    assert detectron2_key(torchvision_key) == detectron2


@pytest.mark.parametrize(
    ("arch", "settings"),
    [
        ("resnet50", {"MODEL.RESNETS.DEPTH": "50"}),
        ("resnet34", {"MODEL.RESNETS.DEPTH": "34", "MODEL.RESNETS.RES2_OUT_CHANNELS": "64"}),
        ("wide_resnet50_2", {"MODEL.RESNETS.DEPTH": "50", "MODEL.RESNETS.WIDTH_PER_GROUP": "128"}),
        (
            "resnext101_32x8d",
            {"MODEL.RESNETS.DEPTH": "101", "MODEL.RESNETS.NUM_GROUPS": "32", "MODEL.RESNETS.WIDTH_PER_GROUP": "8"},
        ),
    ],
)
def test_detectron2_resnet_settings_build_the_same_network(arch, settings):
    # detectron2's res2 bottleneck is NUM_GROUPS x WIDTH_PER_GROUP wide; R18/R34 need RES2_OUT_CHANNELS 64.
    assert detectron2_resnet_config(arch) == settings


def test_detectron2_pixel_statistics_are_those_the_backbone_was_pretrained_with():
    from types import SimpleNamespace

    from pipelines.evaluate.export import detectron2_pixel_statistics

    cifar = SimpleNamespace(
        provenance={"config": {"augment": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2, 0.25, 0.5]}}}
    )
    assert detectron2_pixel_statistics(cifar) == {
        "MODEL.PIXEL_MEAN": "[125.307, 122.961, 113.858]",
        "MODEL.PIXEL_STD": "[51.000, 63.750, 127.500]",
    }
    torchvision = SimpleNamespace(provenance={})  # no run: ImageNet's, as the official detection configs
    assert detectron2_pixel_statistics(torchvision) == {
        "MODEL.PIXEL_MEAN": "[123.675, 116.280, 103.530]",
        "MODEL.PIXEL_STD": "[58.395, 57.120, 57.375]",
    }


def test_the_sidecar_records_provenance_and_the_file_hash(run, tmp_path):
    root, _, config = run
    output = tmp_path / "d2.pkl"
    results = export_backbone(load_backbone(str(root)), "detectron2", str(output))
    sidecar = json.loads(Path(results["sidecar"]).read_text())
    assert results["sidecar"] == f"{output}.json"
    assert sidecar["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    expected = {
        "format": "detectron2",
        "source": str(root),
        "kind": "run",
        "arch": "resnet18",
        "small_image_stem": True,
    }
    assert {key: sidecar[key] for key in expected} == expected
    assert (sidecar["mlflow_run_id"], sidecar["step"], sidecar["config"]) == (RUN_ID, 40, config)
    assert sidecar["provenance"]["checkpoint"].endswith("checkpoint_step000000040")
    assert sidecar["created"].endswith("Z")
    for setting in (
        "MODEL.WEIGHTS d2.pkl",
        "MODEL.RESNETS.DEPTH 18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS 64",
        "INPUT.FORMAT RGB",
    ):
        assert f"detectron2 config: {setting}" in sidecar["how_to_load"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d2.pkl", "d2.pkl.json"]  # no temporary left


def test_an_existing_output_is_refused_unless_forced(run, tmp_path):
    root, _, _ = run
    output = tmp_path / "backbone.pth"
    output.write_bytes(b"precious")
    backbone = load_backbone(str(root))
    with pytest.raises(OutputExists, match="already exists; choose another file or pass --force"):
        export_backbone(backbone, "torchvision", str(output))
    assert output.read_bytes() == b"precious"
    export_backbone(backbone, "torchvision", str(output), force=True)
    assert torch.equal(torch.load(output, weights_only=True)["conv1.weight"], backbone.state_dict["conv1.weight"])
    # A sidecar of the name is someone's file too.
    other = tmp_path / "other.pth"
    Path(f"{other}.json").write_text("notes")
    with pytest.raises(OutputExists, match=f"{other}: {other}.json already exists"):
        export_backbone(backbone, "torchvision", str(other))
    assert Path(f"{other}.json").read_text() == "notes" and not other.exists()


def test_an_export_to_a_uri_is_written_through_pyarrow(run, tmp_path, monkeypatch):
    from pipelines.evaluate import export

    root, weights, _ = run
    remote_filesystem(monkeypatch, export, tmp_path)
    results = export_backbone(load_backbone(str(root)), "torchvision", "remote://bucket/models/resnet18.pth")
    assert results["sidecar"] == "remote://bucket/models/resnet18.pth.json"
    written = torch.load(tmp_path / "bucket" / "models" / "resnet18.pth", weights_only=True)
    assert torch.equal(written["layer3.1.bn1.running_var"], weights[40]["layer3.1.bn1.running_var"])
    sidecar = json.loads((tmp_path / "bucket" / "models" / "resnet18.pth.json").read_text())
    assert sidecar["file"] == "remote://bucket/models/resnet18.pth"
    with pytest.raises(OutputExists):
        export_backbone(load_backbone(str(root)), "torchvision", "remote://bucket/models/resnet18.pth")


# ---------------------------------------------------------------------------- the command


def test_moco_export_end_to_end(run, tmp_path, capsys):
    root, weights, _ = run
    output = tmp_path / "out" / "resnet18.pth"
    argv = ["export", "--backbone", str(root), "--format", "torchvision", "--output", str(output), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out.strip().splitlines()[-1])
    assert results["output"] == str(output) and results["sidecar"] == f"{output}.json"
    assert (results["arch"], results["kind"], results["step"], results["mlflow_run_id"]) == (
        "resnet18",
        "run",
        40,
        RUN_ID,
    )
    assert "export: wrote" in captured.err
    assert torch.equal(
        torch.load(output, weights_only=True)["layer2.0.conv1.weight"], weights[40]["layer2.0.conv1.weight"]
    )
    assert json.loads(Path(f"{output}.json").read_text())["format"] == "torchvision"

    assert cli.main(argv) == 1
    refused = capsys.readouterr().err.strip().splitlines()
    assert refused == [
        f"moco: error: --output {output}: {output} already exists; choose another file or pass --force to overwrite it"
    ]
    assert cli.main([*argv, "--force", "--format", "detectron2"]) == 0
    capsys.readouterr()
    with open(output, "rb") as stream:
        assert "res5.1.conv2.norm.running_mean" in pickle.load(stream)["model"]


def test_moco_export_options_and_errors(run, tmp_path, capsys):
    root, _, _ = run
    base = ["export", "--backbone", str(root / "backbone.pt"), "--format", "torchvision"]
    assert cli.main([*base, "--output", str(tmp_path / "a.pth"), "--set", "model.arch=resnet34"]) == 1
    assert "do not fit resnet34 (from the argument)" in capsys.readouterr().err
    assert cli.main([*base, "--output", str(tmp_path / "a.pth"), "--set", "optim.lr=1"]) == 1
    error = capsys.readouterr().err
    assert "accepts --set model.arch=... and --set model.small_image_stem=...; got --set optim.lr=1" in error
    assert (
        cli.main(
            ["export", "--backbone", str(tmp_path / "nothing"), "--format", "torchvision", "-o", str(tmp_path / "b")]
        )
        == 1
    )
    assert f"{tmp_path / 'nothing'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        cli.main([*base, "--output", str(tmp_path / "c"), "--format", "onnx"])
