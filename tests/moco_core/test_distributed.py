"""Mechanisms in a real 2-process gloo group: gathered keys, identical dictionaries, gradients."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from moco_core import distributed
from moco_core.batchnorm import convert_batchnorm
from moco_core.mechanisms import ContrastiveModel, EndToEnd, MemoryBankModel, MoCo
from moco_core.training import ComputeSettings, build_optimizer, train_step
from tests.moco_core.synthetic import TinyEncoder
from tests.process_group import run_distributed

# ------------------------------------------------------- a DDP step against one process, by value

WORLD, LOCAL_BATCH, STEPS = 2, 4, 2
LR, MOMENTUM, WEIGHT_DECAY = 0.2, 0.9, 1e-2
#: (mechanism, BatchNorm mode on the ranks, the single-process mode that reproduces it exactly)
DDP_CASES = [("moco", "shuffle", "split"), ("moco", "none", "none"), ("end_to_end", "shuffle", "split")]


def _contrastive_model(mechanism: str, batchnorm: str, num_splits: int) -> ContrastiveModel:
    """The same initial weights and queue on every rank and in the reference."""
    torch.manual_seed(0)
    encoder = convert_batchnorm(TinyEncoder(), "split" if num_splits > 1 else "none", num_splits=num_splits)
    if mechanism == "end_to_end":
        return EndToEnd(encoder, temperature=0.2, batchnorm=batchnorm)
    model = MoCo(encoder, queue_size=12, temperature=0.2, batchnorm=batchnorm)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # start the momentum encoder away from the query encoder: the EMA shows
        for parameter in model.momentum_encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    shape = (WORLD * LOCAL_BATCH, 3, 8, 8)
    return [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in range(STEPS)]


def _outcome(model: ContrastiveModel, losses: list[float]) -> dict:
    # BatchNorm running statistics are each rank's own under DDP (never synchronised), so they are
    # left out; parameters, the queue and its pointer must agree.
    return {
        "losses": losses,
        "grads": {n: p.grad.clone() for n, p in model.query_encoder.named_parameters()},
        "state": {
            n: t.clone() for n, t in model.state_dict().items() if "running_" not in n and "num_batches" not in n
        },
    }


def _ddp_steps_worker() -> dict:
    rank, rows = distributed.rank(), slice(distributed.rank() * LOCAL_BATCH, (distributed.rank() + 1) * LOCAL_BATCH)
    outcomes = {}
    for mechanism, batchnorm, _ in DDP_CASES:
        model = _contrastive_model(mechanism, batchnorm, num_splits=1)
        # As the pretraining worker wraps it: buffers (queue, BN statistics) are not broadcast.
        ddp_model = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = build_optimizer(model, weight_decay=WEIGHT_DECAY)
        losses = []
        for step, (query, key) in enumerate(_global_batches()):
            # Each rank draws its own permutation; shuffle BN must use rank 0's.
            torch.manual_seed(100 + 10 * step + rank)
            result = train_step(
                ddp_model, optimizer, query[rows], key[rows], lr=LR, momentum=MOMENTUM, settings=ComputeSettings()
            )
            losses.append(result.loss.item())
        outcomes[(mechanism, batchnorm)] = _outcome(model, losses)
    return outcomes


def _single_process_reference(mechanism: str, reference_batchnorm: str) -> dict:
    model = _contrastive_model(mechanism, reference_batchnorm, num_splits=WORLD)
    optimizer = build_optimizer(model, weight_decay=WEIGHT_DECAY)
    losses = []
    for step, (query, key) in enumerate(_global_batches()):
        torch.manual_seed(100 + 10 * step)  # rank 0's seed: the same permutation of the global batch
        result = train_step(model, optimizer, query, key, lr=LR, momentum=MOMENTUM, settings=ComputeSettings())
        losses.append(result.loss.item())
    return _outcome(model, losses)


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory) -> list[dict]:
    """Every DDP case, run once in one 2-process group (process start-up dominates the cost)."""
    return run_distributed(_ddp_steps_worker, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("mechanism,batchnorm,reference_batchnorm", DDP_CASES)
def test_ddp_steps_match_a_single_process_on_the_global_batch(ddp_outcomes, mechanism, batchnorm, reference_batchnorm):
    """Two DDP steps, each rank holding half of every global batch of 8, against one process that
    trains on the whole batch.

    The reference is exact because its BatchNorm is split into 2 sub-batches (SplitBatchNorm2d),
    which are the ranks' local batches: the queries' statistics are then per-rank, as under DDP.
    Shuffle BN on 2 ranks encodes the keys of ``permutation[:4]`` on rank 0 and ``[4:]`` on
    rank 1 with plain BN, with the permutation drawn on rank 0; 'split' in one process encodes
    the same halves of the same permutation (same seed as rank 0) with split BN: the same keys.
    'none' on the ranks (keys with per-rank statistics, unshuffled) is 'none' over split BN.
    DDP averages the ranks' gradients of their local mean losses, which is the gradient of the
    global mean loss, and both ranks enqueue the keys of both, in rank order: the reference's
    queue. The end-to-end mechanism back-propagates through the keys gathered from both ranks.
    """
    reference = _single_process_reference(mechanism, reference_batchnorm)
    ranks = [outcome[(mechanism, batchnorm)] for outcome in ddp_outcomes]
    close = dict(rtol=1e-4, atol=1e-6)
    for step, expected in enumerate(reference["losses"]):
        assert sum(rank["losses"][step] for rank in ranks) / WORLD == pytest.approx(expected, rel=1e-5), step
    assert set(reference["state"]) == set(ranks[0]["state"])
    for rank, outcome in enumerate(ranks):
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(outcome["grads"][name], grad, **close, msg=f"rank {rank}: grad of {name}")
        # Query and momentum encoders, and the queue with its pointer.
        for name, value in reference["state"].items():
            torch.testing.assert_close(outcome["state"][name], value, **close, msg=f"rank {rank}: {name}")
    if mechanism == "moco":
        assert int(ranks[0]["state"]["queue.pointer"]) == (STEPS * WORLD * LOCAL_BATCH) % 12


def _local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)


def _memory_bank_worker() -> torch.Tensor:
    torch.manual_seed(0)
    model = MemoryBankModel(TinyEncoder(), num_samples=8, num_negatives=4, temperature=0.2)
    query, key = _local_batch(distributed.rank())
    indices = torch.arange(4) + 4 * distributed.rank()
    model(query, key, sample_indices=indices)
    return model.memory_bank.features


def test_memory_bank_is_updated_identically_on_every_rank(tmp_path):
    first, second = run_distributed(_memory_bank_worker, tmp_path)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.manual_seed(0)
    untouched = MemoryBankModel(TinyEncoder(), num_samples=8, num_negatives=4, temperature=0.2).memory_bank.features
    assert (first != untouched).any(dim=1).all()  # both ranks' rows were refreshed everywhere


def _gather_gradient_worker() -> torch.Tensor:
    x = torch.full((2, 3), float(distributed.rank() + 1), requires_grad=True)
    gathered = distributed.all_gather_concat_with_grad(x)  # 4 x 3: rank 0's rows, then rank 1's
    weights = torch.arange(4, dtype=torch.float32)[:, None] * (distributed.rank() + 1)
    (gathered * weights).sum().backward()
    return x.grad


def test_gather_with_grad_sums_each_slices_gradient_over_ranks(tmp_path):
    first, second = run_distributed(_gather_gradient_worker, tmp_path)
    # Row i of the gathered tensor gets weight i on rank 0 and 2i on rank 1: 3i in total.
    torch.testing.assert_close(first, torch.tensor([[0.0] * 3, [3.0] * 3]))
    torch.testing.assert_close(second, torch.tensor([[6.0] * 3, [9.0] * 3]))
