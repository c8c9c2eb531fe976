"""training.precision: explicit values are obeyed; auto on a CPU keeps bf16 only where a timed probe
found it clearly faster.
training.compile: auto compiles on CUDA only."""

import pytest
import torch

import pipelines.pretrain.worker as worker
from moco_core.model import build_model
from pipelines.pretrain.config import load_config

TINY = [
    "model.arch=resnet18",
    "model.small_image_stem=true",
    "model.queue_size=64",
    "augment.size=16",
    "optim.batch_size=8",
    "model.bn_splits=2",
]


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "expected", "why"),
    [
        (2.0, 1.0, torch.bfloat16, "faster here"),
        (1.0, 2.0, None, "bf16 not 1.1x faster here"),
        (1.0, 0.95, None, "bf16 not 1.1x faster here"),  # within the probe's noise: fp32, the same every run
    ],
)
def test_auto_keeps_bf16_only_where_it_is_clearly_faster_on_a_cpu(monkeypatch, fp32_s, bf16_s, expected, why):
    config = load_config("demo", TINY)
    probed = []

    def fake_seconds(encoder, images, settings, repeats=2, give_up_after=None):
        probed.append((tuple(images.shape), settings.autocast_dtype))
        return bf16_s if settings.autocast_dtype is torch.bfloat16 else fp32_s

    monkeypatch.setattr(worker, "forward_backward_seconds", fake_seconds)
    model = build_model(config.model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    settings, reason = worker.compute_settings(config, torch.device("cpu"), model)
    assert settings.autocast_dtype is expected and reason.startswith(why)
    assert probed == [((8, 3, 16, 16), None), ((8, 3, 16, 16), torch.bfloat16)]  # at most 8 images of the run's size
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # a copy is probed


@pytest.mark.parametrize(("precision", "expected"), [("fp32", None), ("bf16", torch.bfloat16)])
def test_explicit_precision_is_obeyed_without_probing(monkeypatch, precision, expected):
    config = load_config("demo", TINY + [f"training.precision={precision}"])
    monkeypatch.setattr(worker, "forward_backward_seconds", lambda *args, **kwargs: pytest.fail("probed"))
    settings, _ = worker.compute_settings(config, torch.device("cpu"), build_model(config.model))
    assert settings.autocast_dtype is expected


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("encoders", "cpu", True), ("none", "cuda", False)],
)
def test_training_compile_is_on_for_cuda_by_default_and_obeyed_when_set(setting, device, expected):
    config = load_config("demo", [f"training.compile={setting}"])
    assert worker.compiles_encoders(config, torch.device(device)) is expected
