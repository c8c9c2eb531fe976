import pytest
import torch

from moco_core.batchnorm import SplitBatchNorm2d, convert_batchnorm
from moco_core.mechanisms import EndToEnd, MemoryBankModel, MoCo
from moco_core.memory_bank import MemoryBank
from moco_core.model import ModelConfig, build_model
from moco_core.training import build_optimizer, train_step
from tests.moco_core.synthetic import TinyEncoder, synthetic_views

TINY = dict(arch="resnet18", small_image_stem=True, head="mlp", dim=32)

MECHANISMS = {
    "moco": lambda encoder: MoCo(encoder, queue_size=32, temperature=0.2, batchnorm="split"),
    "moco-symmetric": lambda encoder: MoCo(encoder, queue_size=32, temperature=0.2, batchnorm="none", symmetric=True),
    "end_to_end": lambda encoder: EndToEnd(encoder, temperature=0.2, batchnorm="split"),
    "memory_bank": lambda encoder: MemoryBankModel(encoder, num_samples=64, num_negatives=32, temperature=0.2),
}


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_each_mechanism_learns_the_easy_task(name):
    torch.manual_seed(0)
    encoder = convert_batchnorm(TinyEncoder(), "split" if name in ("moco", "end_to_end") else "none", num_splits=2)
    model = MECHANISMS[name](encoder)
    optimizer = build_optimizer(model, weight_decay=0.0)
    # Few images for the memory bank so each row is revisited; many for the queue so that a
    # query's own earlier key is rarely among its negatives.
    batches = synthetic_views(64 if name == "memory_bank" else 512, 16)(16)
    losses = []
    for _ in range(60):
        query, key, indices = next(batches)
        losses.append(
            train_step(model, optimizer, query, key, lr=0.1, momentum=0.9, sample_indices=indices).loss.item()
        )
    assert all(torch.isfinite(torch.tensor(losses)))
    # Compared with the early peak: MoCo's loss first rises while the queue fills with real keys.
    assert sum(losses[-5:]) / 5 < 0.8 * max(losses[:10]), losses


@pytest.mark.parametrize("mechanism", ["moco", "end_to_end", "memory_bank"])
def test_build_model_gives_each_mechanism_a_trainable_resnet(mechanism):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(**TINY, mechanism=mechanism, queue_size=16, batchnorm="split", bn_splits=2), num_samples=8
    )
    expected_type = {"moco": MoCo, "end_to_end": EndToEnd, "memory_bank": MemoryBankModel}[mechanism]
    assert type(model) is expected_type
    split_layers = [m for m in model.query_encoder.modules() if isinstance(m, SplitBatchNorm2d)]
    assert len(split_layers) == 20 and all(m.num_splits == 2 for m in split_layers)  # every BN of a resnet18
    optimizer = build_optimizer(model, weight_decay=1e-4)
    query, key, indices = next(synthetic_views(8, 16)(8))
    conv1 = model.query_encoder.backbone.conv1.weight
    before = conv1.detach().clone()
    train_step(model, optimizer, query, key, lr=0.1, momentum=0.99, sample_indices=indices)
    # The first SGD step moves the query backbone by exactly -lr * (grad + weight_decay * w).
    assert conv1.grad is not None and conv1.grad.abs().sum() > 0
    torch.testing.assert_close(conv1.detach(), before - 0.1 * (conv1.grad + 1e-4 * before))


def test_moco_enqueues_keys_and_never_trains_the_momentum_encoder():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, queue_size=20, batchnorm="none"))
    optimizer = build_optimizer(model)
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    query, key, _ = next(synthetic_views(8, 16)(8))
    train_step(model, optimizer, query, key, lr=0.1, momentum=0.99)
    assert int(model.queue.pointer) == 8
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.query_encoder.parameters())
    assert not any(p is q for p in optimizer.param_groups[0]["params"] for q in model.momentum_encoder.parameters())
    train_step(model, optimizer, query, key, lr=0.1, momentum=0.99)
    assert int(model.queue.pointer) == 16  # 8 + 8; the next step wraps around K=20


def test_memory_bank_requires_sample_indices_and_updates_rows():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, mechanism="memory_bank", queue_size=16, batchnorm="none"), num_samples=10)
    before = model.memory_bank.features.clone()
    images = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="sample_indices"):
        model(images, images)
    model(images, images, sample_indices=torch.tensor([1, 3, 5, 7]))
    changed = (model.memory_bank.features != before).any(dim=1)
    assert changed.tolist() == [False, True, False, True, False, True, False, True, False, False]
    with pytest.raises(IndexError, match="out of range"):
        model(images, images, sample_indices=torch.tensor([1, 2, 3, 10]))


def test_memory_bank_reads_and_writes_rows_without_host_reads():
    """The index check runs on the host copy of the indices, before they reach the device: the
    bank's lookup and update on the ``meta`` device (no data) fail on any host read."""
    bank = MemoryBank(10, 4).to("meta")
    indices = torch.tensor([1, 3], device="meta")
    assert bank.lookup(indices).shape == (2, 4)
    bank.update(indices, torch.empty(2, 4, device="meta"), momentum=0.5)
    with pytest.raises(IndexError, match="out of range"):
        bank.check_indices(torch.tensor([1, 10]))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.temperature"):
        build_model(ModelConfig(**TINY, temperature=0.0))
    with pytest.raises(ValueError, match="model.symmetric"):
        build_model(ModelConfig(**TINY, mechanism="memory_bank", symmetric=True), num_samples=4)
    with pytest.raises(ValueError, match="num_samples"):
        build_model(ModelConfig(**TINY, mechanism="memory_bank"))
