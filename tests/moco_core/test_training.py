import io
import subprocess
import sys

import pytest
import torch

from moco_core.model import ModelConfig, build_model
from moco_core.training import ComputeSettings, build_optimizer, train_step
from tests.moco_core.synthetic import synthetic_views

TINY = dict(arch="resnet18", small_image_stem=True, head="mlp", dim=16, queue_size=24, batchnorm="split", bn_splits=2)


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mechanism", ["moco", "end_to_end", "memory_bank"])
def test_state_dict_round_trip_reproduces_the_next_step_exactly(mechanism):
    config = ModelConfig(**TINY, mechanism=mechanism)
    torch.manual_seed(0)
    model = build_model(config, num_samples=32)
    optimizer = build_optimizer(model)
    batches = synthetic_views(32, 16, seed=1)(8)
    for _ in range(3):
        query, key, indices = next(batches)
        train_step(model, optimizer, query, key, lr=0.05, momentum=0.9, sample_indices=indices)
    saved = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    restored = build_model(config, num_samples=32)
    restored_optimizer = build_optimizer(restored)
    restored.load_state_dict(saved["model"])
    restored_optimizer.load_state_dict(saved["optimizer"])

    query, key, indices = next(batches)
    outcomes = []
    for candidate, candidate_optimizer in [(model, optimizer), (restored, restored_optimizer)]:
        torch.manual_seed(42)  # the shuffle permutation / bank draw
        result = train_step(candidate, candidate_optimizer, query, key, lr=0.05, momentum=0.9, sample_indices=indices)
        outcomes.append((result.loss.item(), candidate.state_dict()))
    assert outcomes[0][0] == outcomes[1][0]
    for name, value in outcomes[0][1].items():
        assert torch.equal(value, outcomes[1][1][name]), name


def test_state_dict_holds_everything_needed_to_resume():
    model = build_model(ModelConfig(**TINY))
    keys = set(model.state_dict())
    assert {"queue.keys", "queue.pointer"} <= keys
    assert any(k.startswith("query_encoder.backbone.") for k in keys)
    assert any(k.startswith("momentum_encoder.backbone.") for k in keys)
    bank = build_model(ModelConfig(**TINY, mechanism="memory_bank"), num_samples=5)
    assert "memory_bank.features" in bank.state_dict()


def test_bf16_channels_last_step_runs_and_learns_nothing_strange():
    torch.manual_seed(0)
    settings = ComputeSettings(autocast_dtype=torch.bfloat16, channels_last=True)
    model = build_model(ModelConfig(**TINY)).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model)
    query, key, _ = next(synthetic_views(8, 16)(8))
    result = train_step(model, optimizer, query, key, lr=0.05, momentum=0.9, settings=settings)
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    assert model.queue.keys.dtype == torch.float32


def test_compute_settings_for_cpu():
    settings = ComputeSettings.for_device("cpu")
    assert settings.channels_last
    assert settings.autocast_dtype in (None, torch.bfloat16)
    assert ComputeSettings().prepare(torch.randn(2, 3, 4, 4)).is_contiguous()


def _modules_loaded_by(statement: str, candidates: tuple[str, ...]) -> list[str]:
    code = f"import sys; {statement}; print(sorted(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out.strip())


def test_importing_moco_core_does_not_import_ray_or_mlflow():
    everything = "import moco_core; [getattr(moco_core, name) for name in moco_core.__all__]"
    assert _modules_loaded_by(everything, ("ray", "mlflow", "yaml")) == []


def test_every_exported_name_resolves():
    import moco_core

    assert sorted(moco_core.__all__) == sorted(moco_core._EXPORTS)
    assert all(getattr(moco_core, name) is not None for name in moco_core.__all__)


def test_data_readers_load_the_core_without_torch():
    assert _modules_loaded_by("import moco_core.augment, moco_core.image_io", ("torch", "ray")) == []
