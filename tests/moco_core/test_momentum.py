import pytest
import torch
from torch import nn

from moco_core.momentum import make_momentum_copy, momentum_update


def _pair():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    momentum = make_momentum_copy(query)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))  # make the two encoders differ
    return query, momentum


def test_momentum_zero_copies_query_weights_exactly():
    query, momentum = _pair()
    momentum_update(query, momentum, 0.0)
    for q, k in zip(query.parameters(), momentum.parameters()):
        assert torch.equal(q, k)


def test_momentum_one_freezes_momentum_encoder_exactly():
    query, momentum = _pair()
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(query, momentum, 1.0)
    for b, k in zip(before, momentum.parameters()):
        assert torch.equal(b, k)


@pytest.mark.parametrize("m", [0.5, 0.99, 0.999])
def test_momentum_update_matches_formula(m):
    query, momentum = _pair()
    expected = [m * k + (1 - m) * q for q, k in zip(query.parameters(), momentum.parameters())]
    momentum_update(query, momentum, m)
    for e, k in zip(expected, momentum.parameters()):
        torch.testing.assert_close(k, e, rtol=1e-6, atol=1e-7)


def test_buffers_are_not_averaged():
    query, momentum = _pair()
    query[1].running_mean.fill_(5.0)
    momentum_update(query, momentum, 0.0)
    assert torch.equal(momentum[1].running_mean, torch.zeros(8))


def test_momentum_copy_has_no_gradients():
    query, momentum = _pair()
    assert all(not p.requires_grad for p in momentum.parameters())
    assert all(p.requires_grad for p in query.parameters())


def test_momentum_out_of_range_is_rejected():
    query, momentum = _pair()
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(query, momentum, 1.5)
