import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_core.mechanisms import MoCo
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


def _one_step(settings: ComputeSettings) -> tuple[float, torch.Tensor, torch.Tensor, int]:
    """Loss, query-encoder update (flattened), queue and pointer after one step from a fixed start."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.query_encoder.parameters()]
    optimizer = build_optimizer(model)
    query, key, _ = next(synthetic_views(8, 16)(8))
    torch.manual_seed(1)  # the split-BN permutation
    result = train_step(model, optimizer, query, key, lr=0.05, momentum=0.9, settings=settings)
    assert result.loss.dtype == torch.float32 and model.queue.keys.dtype == torch.float32
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.query_encoder.parameters(), before)])
    return result.loss.item(), update, model.queue.keys.clone(), int(model.queue.pointer)


def test_bf16_channels_last_step_agrees_with_the_fp32_step():
    fp32_loss, fp32_update, fp32_queue, fp32_pointer = _one_step(ComputeSettings())
    loss, update, queue, pointer = _one_step(ComputeSettings(autocast_dtype=torch.bfloat16, channels_last=True))
    # Measured 0.3% apart on an AMD EPYC (AVX512-BF16), 1.7% on an Intel Xeon with AMX-BF16.
    assert loss == pytest.approx(fp32_loss, rel=5e-2)
    assert pointer == fp32_pointer == 8
    # Enqueued keys within bf16 resolution of the fp32 keys (measured max 0.016-0.018); the rest untouched.
    torch.testing.assert_close(queue[:8], fp32_queue[:8], rtol=0, atol=0.05)
    assert torch.equal(queue[8:], fp32_queue[8:])
    # The SGD update points the same way: bf16 backward through a ResNet is noisy per tensor
    # (measured cosine 0.955-0.959 over all parameters), but a wrong gradient would be far off.
    assert F.cosine_similarity(update, fp32_update, dim=0).item() > 0.9


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


# ---------------------------------------------------------------- one whole MoCo step, by value

EPS = 1e-5  # nn.BatchNorm1d's default
BN_MOMENTUM = 0.1  # nn.BatchNorm1d's default running-statistics momentum


class _MLPEncoder(nn.Module):
    """flatten -> Linear -> BatchNorm1d -> ReLU -> Linear -> L2 normalise: small enough that the
    reference below can write its forward pass out as formulas."""

    def __init__(self, in_features: int = 12, hidden: int = 8, dim: int = 4):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.relu(self.bn(self.fc1(images.flatten(1))))), dim=1)


def _reference_embed(params: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder as formulas; also returns the pre-BN activations (for the running statistics).

    Shape:
        images: (N, 3, 2, 2) -> (N, C) unit rows, (N, hidden)
    """
    hidden = images.flatten(1) @ params["fc1.weight"].T + params["fc1.bias"]  # N x hidden
    mean, variance = hidden.mean(dim=0), hidden.var(dim=0, unbiased=False)  # training-mode BN: batch statistics
    normalised = (hidden - mean) / torch.sqrt(variance + EPS) * params["bn.weight"] + params["bn.bias"]
    out = normalised.clamp_min(0) @ params["fc2.weight"].T + params["fc2.bias"]  # N x C
    return out / out.norm(dim=1, keepdim=True), hidden


def _updated_running_stats(buffers: dict, hidden: torch.Tensor) -> dict:
    return {
        "bn.running_mean": (1 - BN_MOMENTUM) * buffers["bn.running_mean"] + BN_MOMENTUM * hidden.mean(dim=0),
        "bn.running_var": (1 - BN_MOMENTUM) * buffers["bn.running_var"] + BN_MOMENTUM * hidden.var(dim=0),
    }


def _reference_moco_step(state: dict, query_view, key_view, *, lr, m, temperature, weight_decay, sgd_momentum):
    """One step of MoCo (Algorithm 1 of the paper, the official main_moco.py order), in float64.

    ``state`` holds ``query`` / ``momentum`` parameters, their BN ``*_buffers``, the SGD momentum
    ``velocity`` (None before the first step), the ``queue`` (K x C) and its ``pointer``.
    Returns the new state, the loss and the pretext top-1.
    """
    names = list(state["query"])
    # 1. Momentum update, before the keys are computed.
    momentum_params = {n: m * state["momentum"][n] + (1 - m) * state["query"][n] for n in names}
    # 2. Keys from the momentum encoder (no gradient); queries from the query encoder.
    keys, key_hidden = _reference_embed(momentum_params, key_view)  # N x C
    query_params = {n: state["query"][n].clone().requires_grad_() for n in names}
    queries, query_hidden = _reference_embed(query_params, query_view)  # N x C
    # 3. logits = [q.k+, q.queue] / T, target class 0, cross entropy.
    positive = (queries * keys).sum(dim=1, keepdim=True)  # N x 1
    negative = queries @ state["queue"].T  # N x K
    logits = torch.cat([positive, negative], dim=1) / temperature  # N x (1+K)
    loss = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    top1 = (logits[:, 0] >= logits[:, 1:].max(dim=1).values).double().mean() * 100
    # 4. SGD with momentum and weight decay (torch.optim.SGD, as the official code uses) on the query encoder.
    grads = dict(zip(names, torch.autograd.grad(loss, [query_params[n] for n in names])))
    velocity = {}
    for n in names:
        direction = grads[n] + weight_decay * state["query"][n]
        previous = state["velocity"]
        velocity[n] = direction if previous is None else sgd_momentum * previous[n] + direction
    query = {n: state["query"][n] - lr * velocity[n] for n in names}
    # 5. Enqueue the keys at the pointer (wrapping), advance the pointer.
    queue, pointer = state["queue"].clone(), state["pointer"]
    for key in keys:
        queue[pointer] = key
        pointer = (pointer + 1) % queue.shape[0]
    new_state = {
        "query": query,
        "momentum": momentum_params,
        "query_buffers": _updated_running_stats(state["query_buffers"], query_hidden.detach()),
        "momentum_buffers": _updated_running_stats(state["momentum_buffers"], key_hidden),
        "velocity": velocity,
        "queue": queue,
        "pointer": pointer,
    }
    return new_state, loss.item(), top1.item()


def _float64(module: nn.Module, buffers: bool = False) -> dict:
    tensors = module.named_buffers() if buffers else module.named_parameters()
    return {n: t.detach().double().clone() for n, t in tensors if n != "bn.num_batches_tracked"}


def test_moco_train_step_matches_the_official_formulas_step_by_step():
    """Three fp32 ``train_step`` calls of a MoCo model against the formulas of the paper.

    BatchNorm 'none': keys are encoded unshuffled, so each encoder's BN uses the plain statistics
    of its whole batch, a closed form the reference can write out. ('split' would add a random
    permutation and sub-batch statistics, tested in test_batchnorm.py; 'shuffle' needs a process
    group, tested against this kind of reference in test_distributed.py.) The momentum encoder
    starts away from the query encoder so that the order "momentum update, then keys" shows;
    K=10 with 4 keys a step makes the third enqueue wrap around; three steps exercise the SGD
    velocity.
    """
    lr, m, temperature, weight_decay, sgd_momentum = 0.3, 0.9, 0.2, 1e-2, 0.9
    torch.manual_seed(0)
    encoder = _MLPEncoder()
    with torch.no_grad():
        encoder.bn.weight.uniform_(0.5, 1.5)
        encoder.bn.bias.uniform_(-0.5, 0.5)
    model = MoCo(encoder, queue_size=10, temperature=temperature, batchnorm="none")
    with torch.no_grad():
        for parameter in model.momentum_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    optimizer = build_optimizer(model, weight_decay=weight_decay, sgd_momentum=sgd_momentum)
    state = {
        "query": _float64(model.query_encoder),
        "momentum": _float64(model.momentum_encoder),
        "query_buffers": _float64(model.query_encoder, buffers=True),
        "momentum_buffers": _float64(model.momentum_encoder, buffers=True),
        "velocity": None,
        "queue": model.queue.keys.double().clone(),
        "pointer": int(model.queue.pointer),
    }
    generator = torch.Generator().manual_seed(1)
    close = dict(rtol=1e-4, atol=1e-5)
    for step in range(3):
        base = torch.randn(4, 3, 2, 2, generator=generator)
        query_view = base + 0.3 * torch.randn(base.shape, generator=generator)
        key_view = base + 0.3 * torch.randn(base.shape, generator=generator)
        result = train_step(model, optimizer, query_view, key_view, lr=lr, momentum=m, settings=ComputeSettings())
        state, expected_loss, expected_top1 = _reference_moco_step(
            state,
            query_view.double(),
            key_view.double(),
            lr=lr,
            m=m,
            temperature=temperature,
            weight_decay=weight_decay,
            sgd_momentum=sgd_momentum,
        )
        assert result.loss.item() == pytest.approx(expected_loss, rel=1e-5), step
        assert result.pretext_top1.item() == pytest.approx(expected_top1), step
        for part, module in [("query", model.query_encoder), ("momentum", model.momentum_encoder)]:
            for name, value in _float64(module).items():
                torch.testing.assert_close(value, state[part][name], **close, msg=f"step {step}: {part} {name}")
            for name, value in _float64(module, buffers=True).items():
                torch.testing.assert_close(value, state[f"{part}_buffers"][name], **close, msg=f"step {step}: {name}")
        torch.testing.assert_close(model.queue.keys.double(), state["queue"], **close)
        assert int(model.queue.pointer) == state["pointer"] == [4, 8, 2][step]


def test_forward_backward_seconds_times_repeats_after_one_untimed_pass():
    from moco_core.training import forward_backward_seconds

    calls = []
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    encoder.register_forward_hook(
        lambda module, inputs, output: calls.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    seconds = forward_backward_seconds(encoder, torch.randn(2, 3, 8, 8), ComputeSettings(None, channels_last=True), 3)
    assert seconds > 0 and calls == [True] * 4
    assert encoder[0].weight.grad is not None


def test_forward_backward_seconds_gives_up_on_a_clearly_slower_candidate():
    from moco_core.training import forward_backward_seconds

    calls = []
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(1))
    forward_backward_seconds(encoder, torch.randn(2, 3, 8, 8), ComputeSettings(), repeats=3, give_up_after=0.0)
    assert len(calls) == 1  # the untimed pass already took longer than allowed


def test_compiled_encoders_keep_state_dict_keys_and_train_like_eager_ones():
    """training.compile: the same keys (checkpoints load either way) and the same steps, momentum
    update, split BN's running statistics and queue included (aot_eager: dynamo and autograd
    tracing without a C++ compiler; inductor was checked by hand on this CPU)."""
    from moco_core.training import compile_encoders

    config = ModelConfig(**TINY)
    states, models = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(config)
        if compiled:
            compile_encoders(model, backend="aot_eager")
        optimizer = build_optimizer(model)
        batches = synthetic_views(8, 16, seed=2)(8)
        losses = []
        for _ in range(2):
            query, key, _ = next(batches)
            losses.append(train_step(model, optimizer, query, key, lr=0.05, momentum=0.9).loss.item())
        states.append((losses, model.state_dict()))
        models.append(model)
    (eager_losses, eager_state), (compiled_losses, compiled_state) = states
    assert list(compiled_state) == list(eager_state)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, value in eager_state.items():
        # Compiled, split BN runs its one-pass form (eager on a CPU: per-block kernels): measured
        # at most 2.5e-5 apart after two steps, on weights up to 0.26.
        torch.testing.assert_close(
            compiled_state[name], value, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert int(models[1].queue.pointer) == 16
    models[0].load_state_dict(compiled_state)  # a compiled run's checkpoint loads into an eager model
