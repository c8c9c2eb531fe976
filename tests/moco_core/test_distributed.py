"""Mechanisms in a real 2-process gloo group: gathered keys, identical dictionaries, gradients."""

import torch

from moco_core import distributed
from moco_core.mechanisms import EndToEnd, MemoryBankModel, MoCo
from tests.moco_core.synthetic import TinyEncoder
from tests.process_group import run_distributed


def _local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)


def _moco_worker() -> dict:
    torch.manual_seed(0)
    model = MoCo(TinyEncoder(), queue_size=10, temperature=0.2, batchnorm="shuffle")
    query, key = _local_batch(distributed.rank())
    torch.manual_seed(100 + distributed.rank())  # ranks would draw different permutations
    for _ in range(2):
        model(query, key, momentum=0.9).loss.backward()
    return {"keys": model.queue.keys, "pointer": int(model.queue.pointer)}


def test_moco_queue_is_identical_on_every_rank_and_holds_all_ranks_keys(tmp_path):
    first, second = run_distributed(_moco_worker, tmp_path)
    assert first["pointer"] == second["pointer"] == (2 * 8) % 10
    torch.testing.assert_close(first["keys"], second["keys"], rtol=0, atol=0)


def _end_to_end_worker() -> dict:
    torch.manual_seed(0)
    model = EndToEnd(TinyEncoder(), temperature=0.2, batchnorm="shuffle")
    query, key = _local_batch(distributed.rank())
    result = model(query, key)
    result.loss.backward()
    grads = [p.grad for p in model.query_encoder.parameters()]
    return {"loss": result.loss.item(), "grad_norm": float(torch.stack([g.norm() for g in grads]).norm())}


def test_end_to_end_backpropagates_through_gathered_keys(tmp_path):
    for result in run_distributed(_end_to_end_worker, tmp_path):
        # 8 keys in the global batch: a loss near ln(8) with gradients flowing.
        assert 0.5 < result["loss"] < 5.0
        assert result["grad_norm"] > 0 and torch.isfinite(torch.tensor(result["grad_norm"]))


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
